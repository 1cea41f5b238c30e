"""The Hugging Face Hub format of `bcc export` (`--format hf`): its folder, key layout and the Hub itself.

`bcc.export.export_checkpoint(..., format="hf")` writes (through `write_hf`) a folder to push to or
share on the Hub:

    out/model.safetensors      the weights in the Hub key layout (below): raw, or the EMA weights
    out/config.json            {"format": "bcc-hf", "format_version": 1}, architecture, backbone, heads,
                               taxonomy, preprocess, temperatures, operating_point, weights (raw|ema),
                               pretrained source and sha256, key_layout
    out/README.md              the model card (`bcc.model_card`): YAML front matter for the Hub, intended
                               and not-intended use, not for clinical use, data, metrics, calibration

Hub key layout (`to_hub_layout` / `from_hub_layout`): the backbone's tensors carry no prefix, so they
are the keys the backbone's own library uses: `timm.create_model(name).load_state_dict(sd, strict=False)`
loads every backbone tensor (only the classifier, which bcc does not use, is missing), and for vgg16_bn
`torchvision.models.vgg16_bn().load_state_dict(sd, strict=False)` loads every `features.*` tensor
(missing: `classifier.*`). The heads live under `heads.<head>.` (`0` the hidden Linear, `3` the output
Linear), which neither library has (they come back as unexpected keys with strict=False).
`read_hf_config` checks such a folder; `bcc.export.load_export_model(dir)` (and `bcc predict
--checkpoint DIR`, `bcc eval --checkpoint DIR`) load it back into an `InferenceModel`;
`hf-hub:org/name[@revision]` (`parse_hub_spec`) downloads it first (`download_export`); `push_export`
uploads it (`HfApi.create_repo` + `upload_folder`, the token from the environment or
`huggingface-cli login`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from bcc.atomic import atomic_path, atomic_write, write_json
from bcc.export import EXPORT_FILE, WEIGHTS_FILE, ExportError, ExportResult, export_info

__all__ = [
    "HF_CONFIG_FILE",
    "HF_FORMAT",
    "HUB_PREFIX",
    "check_license",
    "check_repo_id",
    "download_export",
    "from_hub_layout",
    "hf_config",
    "parse_hub_spec",
    "push_export",
    "read_hf_config",
    "to_hub_layout",
    "write_hf",
]

HF_FORMAT = "bcc-hf"
HF_FORMAT_VERSION = 1
HF_CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
HF_FILES = (WEIGHTS_FILE, HF_CONFIG_FILE, CARD_FILE)  # what a Hub export holds, and all that is uploaded
HEADS_PREFIX = "heads."  # the heads' tensors in the Hub layout (the backbone's carry no prefix)
_BACKBONE_PREFIX = "backbone."
HUB_PREFIX = "hf-hub:"
# owner/name as the Hub spells repo ids: letters, digits, `-`, `_`, `.`; no `--` or `..`; at most 96 characters
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


# --------------------------------------------------------------------------- the Hub format


def check_license(license: str) -> str:  # noqa: A002
    """A Hub license id (`mit`, `apache-2.0`, `cc-by-nc-4.0`, `other`, ...); raises ExportError otherwise."""
    if not _LICENSE.match(license):
        raise ExportError(f"--license {license!r} is not a Hub license id (lower case, e.g. mit, apache-2.0, "
                          "cc-by-nc-4.0, other)")
    return license


def to_hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`MultitaskNet` state dict -> the Hub layout: `backbone.X` -> `X`, `heads.*` unchanged."""
    out = {}
    for k, v in state.items():
        if k.startswith(_BACKBONE_PREFIX):
            name = k[len(_BACKBONE_PREFIX):]
            if name.startswith(HEADS_PREFIX):  # a backbone module called `heads` would collide with ours
                raise ExportError(f"backbone tensor {k} collides with the heads' prefix {HEADS_PREFIX!r} of the "
                                  "Hub layout; export it with --format bcc")
            out[name] = v
        elif k.startswith(HEADS_PREFIX):
            out[k] = v
        else:
            raise ExportError(f"model tensor {k} is neither backbone.* nor heads.*")
    return out


def from_hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_hub_layout`: keys `heads.*` stay, every other key gains `backbone.`."""
    return {(k if k.startswith(HEADS_PREFIX) else _BACKBONE_PREFIX + k): v for k, v in state.items()}


def key_layout(backbone: str) -> dict[str, str]:
    """How `model.safetensors` of a Hub export names its tensors (for config.json and the card)."""
    from bcc.model import VGG_NAME

    if backbone == VGG_NAME:
        lib = ("torchvision: torchvision.models.vgg16_bn().load_state_dict(sd, strict=False) loads every "
               "features.* tensor (missing: classifier.*)")
    else:
        lib = (f"timm: timm.create_model({backbone!r}).load_state_dict(sd, strict=False) loads every backbone "
               "tensor (missing: the classifier only)")
    return {
        "backbone": f"no prefix, the names of the backbone's own library; {lib}",
        "heads": "heads.<head>.0.{weight,bias} (hidden Linear), heads.<head>.3.{weight,bias} (output Linear); "
                 "Linear -> ReLU -> Dropout -> Linear on the backbone's pooled features",
    }


def hf_config(im, kind: str) -> dict[str, Any]:
    """The `config.json` of a Hub export of `im` (an `InferenceModel`) with `kind` ("raw"/"ema") weights."""
    from bcc import __version__
    from bcc.model import VGG_NAME

    info = export_info(im)
    cfg = im.config
    point = None
    if im.operating_point is not None:  # margin: the same decision whatever temperatures are used later
        p = im.operating_point
        point = {"rule": p.get("rule"), "head": p["head"], "positive_label": p.get("positive_label"),
                 "threshold": im.threshold, "margin": float(p["margin"]),
                 **{k: p[k] for k in ("split", "count", "val") if k in p}}
    pretrained = _pretrained_record(im)
    return {
        "format": HF_FORMAT,
        "format_version": HF_FORMAT_VERSION,
        "library_name": "bcc",
        "bcc_version": __version__,
        "architecture": "MultitaskNet",
        "backbone": cfg.model.backbone,
        "backbone_library": "torchvision" if cfg.model.backbone == VGG_NAME else "timm",
        "feature_dim": int(im.model.feature_dim),
        "heads": [{"name": h.name, "num_classes": len(h.labels), "labels": list(h.labels)}
                  for h in im.taxonomy.heads],
        "head_hidden": cfg.model.head_hidden,
        "head_dropout": cfg.model.head_dropout,
        "output": info["model"]["output"],
        "key_layout": key_layout(cfg.model.backbone),
        "weights": kind,
        "step": im.step,
        "taxonomy": info["taxonomy"],
        "preprocess": {**info["preprocess"], "interpolation": "bilinear"},
        "temperatures": info["temperatures"],
        "operating_point": point,
        "pretrained": None if pretrained is None else {
            k: pretrained.get(k) for k in ("source", "kind", "sha256", "backbone")},
    }


def _pretrained_record(im) -> dict[str, Any] | None:
    """What the run started from (`PretrainedRecord.to_dict()`): checkpoint meta, else RUN/pretrained.json."""
    from bcc.checkpoint import read_meta

    record = read_meta(im.checkpoint).get("pretrained")
    if record is None and im.run_dir is not None and (im.run_dir / "pretrained.json").is_file():
        try:
            record = json.loads((im.run_dir / "pretrained.json").read_text())
        except (OSError, ValueError):
            record = None
    if isinstance(record, dict) and record.get("kind") not in (None, "hub"):
        # a local path would publish the trainer's directory layout: keep its last part only
        record = {**record, "source": Path(str(record.get("source", ""))).name}
    return record if isinstance(record, dict) else None


def write_hf(im, state, kind: str, license: str, out: Path, result: ExportResult) -> None:  # noqa: A002
    from safetensors.torch import save_file

    from bcc.model_card import card_facts, render_card

    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(to_hub_layout(state), str(tmp), metadata={"format": "pt", "bcc_format": f"{HF_FORMAT}/1"})
    config = hf_config(im, kind)
    write_json(out / HF_CONFIG_FILE, config)
    with atomic_write(out / CARD_FILE, encoding="utf-8") as f:
        f.write(render_card(config, card_facts(im, kind), license))
    result.files += [out / f for f in HF_FILES]


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of a Hub export, checked: format, version, and every file of the folder present."""
    directory = Path(directory)
    path = directory / HF_CONFIG_FILE
    if not directory.is_dir():
        raise ExportError(f"export {directory} is not a directory")
    if not path.is_file():
        other = " (a --format bcc export: push only --format hf)" if (directory / EXPORT_FILE).is_file() else ""
        raise ExportError(f"{path} is missing: {directory} is not a bcc Hub export{other}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    found = info.get("format") if isinstance(info, dict) else type(info).__name__
    if found != HF_FORMAT:
        raise ExportError(f"{path} is not a {HF_FORMAT} export (format {found!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version > HF_FORMAT_VERSION:
        raise ExportError(f"{path} is {HF_FORMAT} version {version!r}; this bcc reads up to version "
                          f"{HF_FORMAT_VERSION}: upgrade bcc")
    for name in HF_FILES:
        if not (directory / name).is_file():
            raise ExportError(f"export {directory} lacks {name}")
    return info


# --------------------------------------------------------------------------- the Hub itself


def check_repo_id(repo_id: str, what: str = "--push-to-hub") -> str:
    """`owner/name` as the Hub accepts it; raises ExportError naming `what` otherwise."""
    if not (_REPO_ID.match(repo_id) and len(repo_id) <= 96 and "--" not in repo_id and ".." not in repo_id
            and not repo_id.endswith((".git", "."))):
        raise ExportError(f"{what} {repo_id!r} is not a Hub repo id: expected owner/name (letters, digits, "
                          "'-', '_', '.')")
    return repo_id


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """`hf-hub:org/name[@revision]` -> (repo id, revision or None); raises ExportError."""
    if not spec.startswith(HUB_PREFIX):
        raise ExportError(f"{spec!r} does not start with {HUB_PREFIX}")
    repo_id, _, revision = spec[len(HUB_PREFIX):].partition("@")
    check_repo_id(repo_id, "--checkpoint " + HUB_PREFIX)
    if "@" in spec[len(HUB_PREFIX):] and not revision:
        raise ExportError(f"--checkpoint {spec!r}: empty revision after '@'")
    return repo_id, revision or None


def _hub_reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def download_export(spec: str) -> Path:
    """Download `hf-hub:org/name[@revision]` (its three files) with `huggingface_hub.snapshot_download`
    into the Hugging Face cache and return the folder; raises ExportError (one line) when it cannot."""
    repo_id, revision = parse_hub_spec(spec)
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(repo_id=repo_id, revision=revision, repo_type="model",
                                                   allow_patterns=list(HF_FILES))
    except Exception as e:  # noqa: BLE001 - offline, no such repo, gated, network: all one line for the user
        raise ExportError(f"cannot download {spec} from the Hugging Face Hub ({_hub_reason(e)})") from None
    read_hf_config(folder)
    return Path(folder)


def push_export(directory: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """Create the model repo `repo_id` (kept when it exists) and upload a Hub export's files to it.

    The token is huggingface_hub's own (HF_TOKEN, or `huggingface-cli login`); bcc never reads or
    writes it. Returns the repo URL. Raises ExportError for a bad repo id, a folder that is not a
    complete Hub export, or a refusal of the Hub."""
    check_repo_id(repo_id)
    directory = Path(directory)
    read_hf_config(directory)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(directory),
                          allow_patterns=list(HF_FILES), commit_message="Upload bcc export")
    except Exception as e:  # noqa: BLE001 - not logged in, no permission, network
        raise ExportError(f"cannot upload {directory} to the Hub repo {repo_id} ({_hub_reason(e)}); log in with "
                          "`huggingface-cli login` or set HF_TOKEN") from None
    return str(url)
