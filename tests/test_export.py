"""bcc export: safetensors + bcc_export.json loadable by `load_exported` without the training stack;
the export's predictions equal the checkpoint's; TorchScript when tracing works; ONNX skipped cleanly.
`--format hf`: the Hub folder (config.json, model card, timm/torchvision key layout), loaded by predict
and eval from the folder and from `hf-hub:` (the download monkeypatched), pushed up to the upload call."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import bcc_in_process
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


def test_export_round_trip(trained_run, synth_data, tmp_path, bcc_main):  # noqa: F811
    from bcc.predict import load_inference_model, predict_paths, write_temperatures

    # a calibrated checkpoint: the temperatures must travel with the export
    ckpt = load_inference_model(trained_run, calibrated=False).checkpoint
    calibrated = tmp_path / "ckpt"
    import shutil

    shutil.copytree(ckpt, calibrated)
    write_temperatures(calibrated, {"binary": 1.5, "subtype": 0.8}, {"split": "val"})

    out = tmp_path / "export"
    proc = bcc_main("export", "--checkpoint", calibrated, "--out", out, "--torchscript", "--onnx")
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


# --------------------------------------------------------------------------- the Hub format

@pytest.fixture(scope="module")
def hf_export(trained_run, synth_shards, tmp_path_factory):  # noqa: F811
    """A copy of the run with temperatures, an operating point and a `bcc eval` of its test split, exported
    with `bcc export --format hf` through the real entry point. Returns (run copy, export dir, eval report)."""
    from bcc.evaluate import evaluate_checkpoint
    from bcc.operating_point import write_operating_point
    from bcc.predict import load_inference_model, write_temperatures

    root = tmp_path_factory.mktemp("hf")
    run = root / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    im = load_inference_model(run, device="cpu", calibrated=False)
    write_temperatures(im.checkpoint, {"binary": 1.5, "subtype": 0.8}, {"split": "val", "count": 36, "ece_before": {
        "combined": 0.2}, "ece_after": {"combined": 0.1}})
    write_operating_point(im.checkpoint, "youden", 0.4, im.taxonomy, temperature=1.5,
                          info={"split": "val", "count": 36, "val": {"argmax": {"sens": 0.5, "spec": 1.0},
                                                                     "chosen": {"sens": 0.8, "spec": 0.9}}})
    evaluation = evaluate_checkpoint(run, synth_shards, split="test", out=run / "eval-test", workers=0)
    out = root / "export"
    assert bcc_in_process("export", "--format", "hf", "--checkpoint", run, "--out", out, "--license", "cc-by-nc-4.0") == 0
    return run, out, evaluation


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_hf_export_folder_config_and_card(hf_export):
    run, out, evaluation = hf_export
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert (config["format"], config["format_version"], config["backbone"], config["weights"]) == (
        "bcc-hf", 1, "test_resnet", "raw")
    assert config["taxonomy"]["name"] == "all-4class" and [h["name"] for h in config["heads"]] == ["binary", "subtype"]
    assert config["preprocess"]["image_size"] == 32 and len(config["preprocess"]["mean"]) == 3
    assert config["temperatures"] == {"binary": 1.5, "subtype": 0.8}
    assert config["operating_point"]["rule"] == "youden" and config["operating_point"]["threshold"] == pytest.approx(0.4)
    assert str(run.parent) not in (out / "config.json").read_text()  # no path of the trainer's machine

    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "bcc" and meta["license"] == "cc-by-nc-4.0" and "test_resnet" in meta["tags"]
    for text in ("Not for clinical use", "## Intended use", "## Not intended use", "## Training data",
                 "## Evaluation", "## Calibration", "## Limitations", "## Pretrained source", "raw trained weights",
                 f"**{evaluation['count']} images**", "`binary` T=1.5000", "Operating point `youden`",
                 "0.800/0.900 at this point", "heads.<head>.0", "combined: 0.2000 raw, 0.1000 temperature-scaled"):
        assert text in card, text
    # split sizes from the manifest, per-class results from the evaluation's confusion matrix
    assert "| test | 36 | 9 | 9 | 9 | 9 |" in card
    confusion = evaluation["combined"]["confusion"]
    for i, name in enumerate(evaluation["classes"]):
        assert f"| {name} | {sum(confusion[i])} |" in card
    assert str(run.parent) not in card


def test_hf_export_backbone_loads_into_timm(hf_export):
    import timm
    from safetensors.torch import load_file

    _, out, _ = hf_export
    state = load_file(str(out / "model.safetensors"))
    model = timm.create_model("test_resnet", pretrained=False)
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]  # the classifier only
    assert result.unexpected_keys and all(k.startswith("heads.") for k in result.unexpected_keys)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)


def test_vgg16_bn_layout_is_torchvision_features():
    """Key level, on the meta device (no 138M random weights): every backbone key is a torchvision
    vgg16_bn `features.*` key of the same shape, and every `features.*` key is there."""
    import torchvision

    from bcc.export_hf import from_hub_layout, to_hub_layout
    from bcc.model import MultitaskNet, build_backbone

    with torch.device("meta"):
        backbone, dim = build_backbone("vgg16_bn")
        ours = to_hub_layout(MultitaskNet(backbone, dim, {"binary": 2}, backbone_name="vgg16_bn").state_dict())
        theirs = torchvision.models.vgg16_bn(weights=None).state_dict()
    features = {k: v.shape for k, v in theirs.items() if k.startswith("features.")}
    assert {k: v.shape for k, v in ours.items() if not k.startswith("heads.")} == features
    assert {k for k in ours if k.startswith("heads.")} == {f"heads.binary.{i}.{p}" for i in (0, 3)
                                                           for p in ("weight", "bias")}
    assert all(k.startswith(("backbone.features.", "heads.")) for k in from_hub_layout(ours))


def test_predict_and_eval_from_the_export_and_the_hub_equal_the_checkpoint(hf_export, synth_data, synth_shards,
                                                                          tmp_path, monkeypatch):
    import huggingface_hub

    from bcc.cli import main
    from bcc.evaluate import evaluate_checkpoint

    run, out, evaluation = hf_export
    images = [str(p) for c in ("Benign", "Early", "Pre", "Pro") for p in sorted((synth_data / c).iterdir())[:2]]
    asked = []

    def fake_download(**kwargs):  # the Hub, offline: the local export stands in for the repo
        asked.append(kwargs)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    results = {}
    for name, source in (("run", str(run)), ("export", str(out)), ("hub", "hf-hub:bcc-test/all-cells@v1")):
        assert main(["predict", "--checkpoint", source, *images, "--json", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert [(a["repo_id"], a["revision"]) for a in asked] == [("bcc-test/all-cells", "v1")]
    assert results["run"]["threshold"] == pytest.approx(results["export"]["threshold"])
    for name in ("export", "hub"):
        assert results[name]["calibrated"] and results[name]["threshold"] is not None
        for a, b in zip(results["run"]["predictions"], results[name]["predictions"], strict=True):
            assert a["answer"] == b["answer"] and a["head_labels"] == b["head_labels"]
            for head, probs in a["head_probs"].items():
                assert probs == pytest.approx(b["head_probs"][head], abs=1e-6)

    again = evaluate_checkpoint(out, synth_shards, split="test", out=tmp_path / "ev", workers=0)
    assert again["count"] == evaluation["count"]
    assert again["combined"]["confusion"] == evaluation["combined"]["confusion"]
    assert again["combined"]["acc"] == pytest.approx(evaluation["combined"]["acc"])


def test_ema_weights_are_chosen_and_said(trained_run, tmp_path):  # noqa: F811
    from safetensors.torch import load_file, save_file

    from bcc.export import ExportError, export_checkpoint
    from bcc.export_hf import to_hub_layout
    from bcc.predict import load_inference_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(load_inference_model(trained_run, device="cpu").checkpoint, ckpt)
    with pytest.raises(ExportError, match="holds no EMA weights.*model_ema.safetensors"):
        export_checkpoint(ckpt, tmp_path / "none", format="hf", weights="ema")
    raw = load_file(str(ckpt / "model.safetensors"))
    ema = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in raw.items()}
    save_file(ema, str(ckpt / "model_ema.safetensors"))
    for weights, expected in (("auto", ema), ("raw", raw)):
        out = tmp_path / weights
        export_checkpoint(ckpt, out, format="hf", weights=weights)
        kind = "ema" if expected is ema else "raw"
        assert json.loads((out / "config.json").read_text())["weights"] == kind
        assert ("exponential moving average (EMA)" in (out / "README.md").read_text()) == (kind == "ema")
        written = load_file(str(out / "model.safetensors"))
        assert written.keys() == to_hub_layout(expected).keys()
        assert all(torch.equal(written[k], v) for k, v in to_hub_layout(expected).items())
    with pytest.raises(ExportError, match="--license"):
        export_checkpoint(ckpt, tmp_path / "bad", format="hf", license="MIT License")


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records create_repo/upload_folder, fails on anything else."""

    calls: list = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))

    def __getattr__(self, name):
        raise AssertionError(f"HfApi.{name} must not be called")


def test_push_to_hub_offline_up_to_the_upload(hf_export, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from bcc.cli import main

    run, out, _ = hf_export
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    assert main(["export", "--out", str(out), "--push-to-hub", "bcc-test/all-cells", "--private"]) == 0
    (c1, create), (c2, upload) = RecordingHfApi.calls
    assert (c1, create["repo_id"], create["private"], create["repo_type"]) == ("create_repo", "bcc-test/all-cells",
                                                                             True, "model")
    assert (c2, upload["repo_id"], upload["folder_path"]) == ("upload_folder", "bcc-test/all-cells", str(out))
    assert sorted(upload["allow_patterns"]) == ["README.md", "config.json", "model.safetensors"]

    bcc_format = tmp_path / "bcc-format"
    bcc_format.mkdir()
    (bcc_format / "bcc_export.json").write_text("{}")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(out, incomplete)
    (incomplete / "README.md").unlink()
    capsys.readouterr()
    RecordingHfApi.calls.clear()
    for argv, message in (
        (["--out", str(out), "--push-to-hub", "not a repo"], "'not a repo' is not a Hub repo id"),
        (["--out", str(out), "--push-to-hub", "a/b/c"], "'a/b/c' is not a Hub repo id"),
        (["--out", str(bcc_format), "--push-to-hub", "o/n"], "a --format bcc export"),
        (["--out", str(incomplete), "--push-to-hub", "o/n"], "lacks README.md"),
        (["--out", str(tmp_path / "x"), "--checkpoint", str(run), "--push-to-hub", "o/n"], "add --format hf"),
        (["--out", str(out), "--private"], "--private only applies with --push-to-hub"),
    ):
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and message in err, (argv, err)
    assert RecordingHfApi.calls == []


def test_hub_specs_and_an_unreachable_hub_are_one_line(synth_data, tmp_path):
    from bcc.export import ExportError
    from bcc.export_hf import parse_hub_spec

    assert parse_hub_spec("hf-hub:org/name") == ("org/name", None)
    assert parse_hub_spec("hf-hub:org/name@main") == ("org/name", "main")
    for bad in ("hf-hub:name", "hf-hub:org/name@", "hf-hub:org//x", "hf-hub:o/n--m"):
        with pytest.raises(ExportError):
            parse_hub_spec(bad)
    image = str(next((synth_data / "Benign").iterdir()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run([sys.executable, "-m", "bcc", "predict", "--checkpoint", "hf-hub:bcc-test/all-cells", image],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot download hf-hub:bcc-test/all-cells"), lines


def test_hf_export_is_a_pretrained_source(hf_export):
    """`model.pretrained=HF_EXPORT` (folder or its model.safetensors) loads backbone and heads back."""
    import dataclasses

    from bcc.model import build_model
    from bcc.predict import load_inference_model

    run, out, _ = hf_export
    im = load_inference_model(run, device="cpu")
    for source in (out, out / "model.safetensors"):
        cfg = dataclasses.replace(im.config.model, pretrained=str(source))
        model = build_model(cfg, im.taxonomy.head_sizes, taxonomy=im.taxonomy)
        record = model.pretrained_record
        assert record.kind == "hf-export" and record.loaded == record.total
        assert record.heads_loaded == ("binary", "subtype") and not record.unexpected
        assert all(torch.equal(v, im.model.state_dict()[k]) for k, v in model.state_dict().items())


def test_an_export_is_not_recalibrated_in_place(hf_export, synth_shards):
    from bcc.calibrate_run import calibrate_checkpoint
    from bcc.evaluate import EvalError

    _, out, _ = hf_export
    with pytest.raises(EvalError, match="is an export: calibrate the run's checkpoint"):
        calibrate_checkpoint(out, synth_shards)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_the_card_names_a_dataset_read_from_a_url(synth_shards):
    """A run trained from a URL (or pipe:) dataset: the card's training data is read from there and named
    by the location's last part (its root is a str, and export died on `.name` with a traceback)."""
    from types import SimpleNamespace

    from test_remote import serve

    from bcc.config import DataConfig
    from bcc.manifest import Manifest
    from bcc.model_card import _data_facts

    count = Manifest.load(synth_shards).split("train").count
    with serve(synth_shards.parent) as (_, url):
        for shards in (f"{url}/{synth_shards.name}", f"{url}/{synth_shards.name}/manifest.json",
                       f"pipe:cat {synth_shards}/{{name}}"):
            facts = _data_facts(SimpleNamespace(config=SimpleNamespace(data=DataConfig(shards=shards))))
            assert facts["name"] == synth_shards.name and facts["splits"]["train"]["count"] == count
