"""bcc export: safetensors + bcc_export.json loadable by `load_exported` without the training stack;
the export's predictions equal the checkpoint's; TorchScript when tracing works; ONNX skipped cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from test_evaluate import trained_run  # noqa: F401 - session fixture shared by the evaluation tests

# Runs in a fresh interpreter: loads the export, predicts every image given, and reports which heavy
# modules got imported.
LOADER = r"""
import json, sys
from PIL import Image
import torch
from bcc.export import load_exported

model, taxonomy, preprocess = load_exported(sys.argv[1])
x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in sys.argv[2:]])
with torch.no_grad():
    logits = model(x)
t = preprocess.temperatures
probs = [(z / t.get(h, 1.0)).softmax(-1) for h, z in zip(taxonomy.head_names, logits)]
ts = torch.jit.load(sys.argv[1] + "/model.torchscript.pt")
with torch.no_grad():
    traced = ts(x)
print(json.dumps({
    "classes": [taxonomy.class_names[int(c)] for c in taxonomy.decide(probs)],
    "probs": [p.tolist() for p in probs],
    "traced_max_diff": max(float((a - b).abs().max()) for a, b in zip(logits, traced)),
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("accelerate", "webdataset", "torchmetrics",
                       "matplotlib") or m in ("bcc.train", "bcc.checkpoint", "bcc.config", "bcc.stream")),
}))
"""


def test_export_round_trip(trained_run, synth_data, tmp_path):  # noqa: F811
    from bcc.predict import load_inference_model, predict_paths, write_temperatures

    # a calibrated checkpoint: the temperatures must travel with the export
    ckpt = load_inference_model(trained_run, calibrated=False).checkpoint
    calibrated = tmp_path / "ckpt"
    import shutil

    shutil.copytree(ckpt, calibrated)
    write_temperatures(calibrated, {"binary": 1.5, "subtype": 0.8}, {"split": "val"})

    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "bcc", "export", "--checkpoint", str(calibrated), "--out", str(out),
                           "--torchscript", "--onnx"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ONNX skipped: the onnx package is not installed" in proc.stdout
    info = json.loads((out / "bcc_export.json").read_text())
    assert info["temperatures"] == {"binary": 1.5, "subtype": 0.8}
    assert info["preprocess"]["image_size"] == 32 and info["taxonomy"]["name"] == "all-4class"
    assert [h["name"] for h in info["model"]["heads"]] == ["binary", "subtype"]

    images = [str(p) for c in ("Benign", "Early", "Pre", "Pro") for p in sorted((synth_data / c).iterdir())[:3]]
    proc = subprocess.run([sys.executable, "-c", LOADER, str(out), *images], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert exported["imported"] == []  # no training stack behind load_exported
    assert exported["traced_max_diff"] < 1e-4

    im = load_inference_model(calibrated, device="cpu")
    assert im.temperatures == {"binary": 1.5, "subtype": 0.8}
    result = predict_paths(im, images, batch_size=5)
    assert [p.class_name for p in result.predictions] == exported["classes"]
    for h, head in enumerate(im.taxonomy.head_names):
        expected = torch.tensor([list(p.head_probs[head].values()) for p in result.predictions])
        assert torch.allclose(torch.tensor(exported["probs"][h]), expected, atol=1e-5)
