"""bcc.pretrained: every kind of weight source, the load line, head re-initialisation, refusal of a
backbone that does not fit (and its explicit override), and one named error for every bad source.

Weights are made in the test: timm's `test_resnet` and a tiny VGG-like backbone; nothing downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from bcc.checkpoint import Checkpoint, CheckpointManager, TrainState
from bcc.config import Config, DataConfig, ModelConfig, config_to_dict
from bcc.errors import BccError
from bcc.model import MultitaskNet, VGGBackbone, build_model
from bcc.pretrained import (
    PretrainedError,
    SourcePreprocess,
    explicit_keys,
    follow_pretrained,
    follow_source,
    load_pretrained,
    resolve_source,
)
from bcc.taxonomy import Taxonomy

TINY = "test_resnet"
HIDDEN = 16
ALL = Taxonomy.default()  # binary (2) + subtype (3)
WBC = Taxonomy.from_dict({"name": "wbc", "heads": [{"name": "cell", "labels": ["EOS", "LYM", "MON", "NEU"]}]})
SOURCE_DATA = DataConfig(image_size=48, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=0.875)


def tiny(taxonomy=ALL, seed=0, backbone=TINY) -> MultitaskNet:
    """A test_resnet MultitaskNet with the heads of `taxonomy` (a Taxonomy or {head: classes})."""
    torch.manual_seed(seed)
    cfg = SimpleNamespace(
        backbone=backbone, pretrained="", head_hidden=HIDDEN, head_dropout=0.0, channels_last=False
    )
    return build_model(cfg, getattr(taxonomy, "head_sizes", taxonomy))


def backbone_tensors(model):
    return {
        k: v for k, v in model.state_dict().items() if k.startswith("backbone.") and "num_batches" not in k
    }


def assert_same(model, donor, prefix="backbone."):
    own, ref = model.state_dict(), donor.state_dict()
    keys = [k for k in ref if k.startswith(prefix)]
    assert keys
    for k in keys:
        assert torch.equal(own[k], ref[k]), k


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_run(run_dir, models_and_metrics, taxonomy=ALL, backbone=TINY, ema=None):
    """A bcc run directory with one checkpoint per (model, metric), steps 2, 4, ...; `ema`: a model
    whose weights every checkpoint keeps as its EMA (`model_ema.safetensors`)."""
    cfg = Config(data=SOURCE_DATA, model=ModelConfig(backbone=backbone, head_hidden=HIDDEN, head_dropout=0.0))
    meta = {"taxonomy": taxonomy.to_dict(), "model": config_to_dict(cfg.model), "config": config_to_dict(cfg)}
    manager = CheckpointManager(
        run_dir / "checkpoints", keep_last=5, keep_top_k=5, metric="bacc4", mode="max"
    )
    state = TrainState()
    for i, (model, metric) in enumerate(models_and_metrics):
        state.step = 2 * (i + 1)
        manager.save(
            Checkpoint(model=model.state_dict(), optimizer={}, scaler=None, rng=[], state=state, meta=meta,
                       ema=None if ema is None else ema.state_dict()),
            metric,
        )
    (run_dir / "summary.json").write_text("{}")  # finished (a source without it gets a warning)
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run whose best checkpoint (step 2) is not its latest (step 4)."""
    best, latest = tiny(seed=1), tiny(seed=2)
    run_dir = make_run(tmp_path_factory.mktemp("src") / "run", [(best, 0.9), (latest, 0.5)])
    return SimpleNamespace(dir=run_dir, best=best, latest=latest)


# --------------------------------------------------------------------------- each kind of source


def test_run_dir_loads_its_best_checkpoint_with_heads_and_config(run, capsys):
    model = tiny()
    record = load_pretrained(model, run.dir, taxonomy=ALL)
    assert_same(model, run.best, prefix="")  # backbone and heads: same taxonomy, same shapes
    weights = run.dir / "checkpoints" / "step-00000002" / "model.safetensors"
    assert record.kind == "run" and record.path == str(weights.resolve())  # the step, not the moving link
    assert record.sha256 == sha(weights)
    assert record.loaded == record.total == len(backbone_tensors(model))
    assert record.heads_loaded == ("binary", "subtype") and record.heads_reinitialised == ()
    assert record.missing == () and record.unexpected == () and record.skipped == ()
    assert record.backbone == TINY
    assert record.preprocess == SourcePreprocess(
        (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 48, 0.875, "bcc checkpoint config"
    )
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith(
        f"pretrained: {record.total} of {record.total} backbone tensors loaded from {run.dir} "
        f"(sha256 {record.sha256[:12]})"
    )
    assert "checkpoint step-00000002, raw weights; heads loaded: binary, subtype" in out
    json.dumps(record.to_dict())  # the run directory and the model card store it as JSON


def test_an_ema_run_gives_the_weights_bcc_export_takes(tmp_path, capsys):
    """A run kept with train.ema_decay: its EMA weights, as `bcc export`/`bcc eval --weights auto` take
    them, said in the load line; a checkpoint whose stored calibration is of the raw weights only gives
    its raw weights (auto's fallback there too)."""
    raw, ema = tiny(seed=5), tiny(seed=6)
    run_dir = make_run(tmp_path / "run", [(raw, 0.9)], ema=ema)
    step = run_dir / "checkpoints" / "step-00000002"
    model = tiny()
    record = load_pretrained(model, run_dir, taxonomy=ALL)
    assert_same(model, ema, prefix="")
    assert record.path == str((step / "model_ema.safetensors").resolve())
    assert record.sha256 == sha(step / "model_ema.safetensors")
    assert "checkpoint step-00000002, EMA weights;" in capsys.readouterr().out
    (step / "temperature.json").write_text(json.dumps({"temperatures": {"binary": 1.0, "subtype": 1.0}}))
    model = tiny()
    record = load_pretrained(model, run_dir / "checkpoints" / "best", taxonomy=ALL)
    assert_same(model, raw, prefix="") and record.path.endswith("step-00000002/model.safetensors")
    assert "checkpoint step-00000002, raw weights;" in capsys.readouterr().out
    (step / "model_ema.safetensors").unlink()  # listed in hashes.json: damaged, as bcc eval/export say (b14h F3)
    with pytest.raises(PretrainedError, match=r"checkpoint is damaged: model_ema.safetensors is missing"):
        load_pretrained(tiny(), run_dir, taxonomy=ALL)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    """NaN/Inf in a source (a diverged run) is the source's fault, named here, not a NaN loss at step 1."""
    state = tiny(seed=7).state_dict()
    key = next(k for k in state if k.startswith("backbone.") and state[k].is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError, match=rf"nan\.pth: tensor {key} holds NaN or Inf values; its training"):
        load_pretrained(model, tmp_path / "nan.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_an_unfinished_source_run_is_said_and_recorded(run, tmp_path, capsys):
    """A run without summary.json (killed or still training) loads, with a warning and `unfinished` recorded."""
    import shutil

    assert not load_pretrained(tiny(), run.dir, taxonomy=ALL).unfinished and "warning" not in capsys.readouterr().out
    killed = shutil.copytree(run.dir, tmp_path / "killed", symlinks=True)
    (killed / "summary.json").unlink()
    record = load_pretrained(tiny(), killed, taxonomy=ALL)
    out = capsys.readouterr().out
    assert record.unfinished and record.to_dict()["unfinished"] is True
    assert f"warning: pretrained source {killed} did not finish (no summary.json): these are its weights at " \
           "step-00000002" in " ".join(out.split())


def test_run_dir_without_best_takes_the_latest(tmp_path):
    first, second = tiny(seed=3), tiny(seed=4)
    run_dir = make_run(tmp_path / "run", [(first, None), (second, None)])
    model = tiny()
    load_pretrained(model, run_dir, echo=False)
    assert_same(model, second, prefix="")


def test_checkpoint_dir_and_checkpoints_root(run):
    model = tiny()
    record = load_pretrained(model, run.dir / "checkpoints" / "step-00000004", echo=False)
    assert record.kind == "checkpoint"
    assert_same(model, run.latest, prefix="")
    model = tiny()
    assert load_pretrained(model, run.dir / "checkpoints", echo=False).kind == "checkpoint"
    assert_same(model, run.best, prefix="")


def test_a_damaged_checkpoint_is_refused_as_a_source(tmp_path):
    """Weights whose bytes differ from the checkpoint's hashes.json do not seed a run quietly."""
    run_dir = make_run(tmp_path / "run", [(tiny(seed=5), 0.9)])
    weights = run_dir / "checkpoints" / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside a tensor: the file still loads
    weights.write_bytes(bytes(data))
    for source in (run_dir, weights):
        with pytest.raises(PretrainedError, match=r"model.safetensors are damaged: sha256 .* \(hashes.json\)"):
            load_pretrained(tiny(), source, echo=False)


def test_export_folder(run, tmp_path):
    from bcc.export import export_checkpoint

    out = export_checkpoint(run.dir, tmp_path / "export").directory
    model = tiny()
    record = load_pretrained(model, out, taxonomy=ALL, echo=False)
    assert record.kind == "export" and record.sha256 == sha(out / "model.safetensors")
    assert_same(model, run.best, prefix="")
    assert record.preprocess == SourcePreprocess((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 48, 0.875, "bcc export")


def test_a_bare_file_gives_no_heads_to_a_run_with_a_taxonomy(run, tmp_path, capsys):
    """A copy of a run's model_best.safetensors loaded its heads into a run whose taxonomy ordered the
    labels the other way (val AUROC 0.0, issue-14 breaker): a file that does not say its taxonomy
    gives its backbone only, said on the load line; the run dir itself still gives its heads."""
    import shutil

    bare = tmp_path / "all_model.safetensors"
    shutil.copy(run.dir / "model_best.safetensors", bare)
    model = tiny()
    record = load_pretrained(model, bare, taxonomy=ALL.to_dict())
    assert record.heads_loaded == () and record.heads_reinitialised == ("binary", "subtype")
    assert record.loaded == record.total == len(backbone_tensors(model))
    assert ("heads re-initialised: binary, subtype (the source does not say its taxonomy (a bare weights file): give "
            "its run, checkpoint or export to load its heads)") in " ".join(capsys.readouterr().out.split())
    assert load_pretrained(tiny(), run.dir, taxonomy=ALL.to_dict(), echo=False).heads_loaded == ("binary", "subtype")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_whole_model_state_dict_file(tmp_path, suffix):
    donor = tiny(seed=5)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(donor.state_dict(), str(path))
    else:  # a training script's checkpoint of a DDP-wrapped model, nested under "model"
        torch.save({"model": {f"module.{k}": v for k, v in donor.state_dict().items()}, "epoch": 3}, path)
    model = tiny()
    record = load_pretrained(model, path, echo=False)
    assert record.kind == "file" and record.sha256 == sha(path) and record.path == str(path)
    assert_same(model, donor, prefix="")
    assert record.heads_loaded == ("binary", "subtype")
    assert record.preprocess == SourcePreprocess()  # a bare file does not say


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_bare_timm_backbone_takes_the_backbone_and_reports_the_classifier(tmp_path, suffix, capsys):
    donor = timm.create_model(TINY, num_classes=10)  # keys without `backbone.`, plus fc.*
    path = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        save_file(donor.state_dict(), str(path))
    else:
        torch.save(donor.state_dict(), path)
    model = tiny()
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("heads.")}
    record = load_pretrained(model, path)
    own = model.state_dict()
    for k, v in donor.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(own[f"backbone.{k}"], v), k
    assert all(torch.equal(own[k], v) for k, v in heads_before.items())  # heads keep their initialisation
    assert record.loaded == record.total and set(record.unexpected) == {"fc.weight", "fc.bias"}
    assert record.heads_reinitialised == ("binary", "subtype") and "no heads" in record.heads_note
    line = capsys.readouterr().out.strip()
    assert line.startswith(
        f"pretrained: {record.total} of {record.total} backbone tensors loaded from {path} (sha256 "
    )
    assert "unexpected (ignored): fc." in line and "heads re-initialised: binary, subtype" in line


def tiny_vgg(widths=(8, 16)) -> VGGBackbone:
    layers, c = [], 3
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = w
    return VGGBackbone(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1))


def vgg_net(taxonomy=ALL, widths=(8, 16)):
    return MultitaskNet(
        tiny_vgg(widths), widths[-1], taxonomy.head_sizes, hidden=HIDDEN, backbone_name="tiny_vgg"
    )


def test_torchvision_style_vgg_state_dict(tmp_path):
    donor = tiny_vgg()
    state = {
        **donor.state_dict(),
        "classifier.0.weight": torch.zeros(4, 16),
        "classifier.0.bias": torch.zeros(4),
    }
    # torchvision's old weights have no BatchNorm counters: they are not weights and not required
    state = {k: v for k, v in state.items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "vgg.pth")
    model = vgg_net()
    record = load_pretrained(model, tmp_path / "vgg.pth", echo=False)
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[f"backbone.{k}"], v), k
    assert record.loaded == record.total == 12  # 2 x (conv w, b + bn w, b, mean, var)
    assert record.unexpected == ("classifier.0.weight", "classifier.0.bias") and record.missing_backbone == []


# --------------------------------------------------------------------------- heads and taxonomy


def test_other_taxonomy_reinitialises_heads_and_takes_the_backbone(tmp_path, capsys):
    donor = tiny(WBC, seed=6)
    run_dir = make_run(tmp_path / "wbc", [(donor, 0.8)], taxonomy=WBC)
    model = tiny(ALL)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("heads.")}
    record = load_pretrained(model, run_dir, taxonomy=ALL)
    assert_same(model, donor)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.items())
    assert record.heads_reinitialised == ("binary", "subtype") and "taxonomy differs" in record.heads_note
    assert set(record.unexpected) == {k for k in donor.state_dict() if k.startswith("heads.cell.")}
    assert "heads re-initialised: binary, subtype (the taxonomy differs)" in capsys.readouterr().out


def test_same_head_shape_but_other_taxonomy_is_not_loaded(tmp_path):
    other = Taxonomy.from_dict({"name": "other", "heads": [{"name": "binary", "labels": ["x", "y"]}]})
    mine = Taxonomy.from_dict(
        {"name": "mine", "heads": [{"name": "binary", "labels": ["Benign", "Malignant"]}]}
    )
    donor = tiny(other, seed=7)
    run_dir = make_run(tmp_path / "run", [(donor, 0.8)], taxonomy=other)
    model = tiny(mine)
    assert load_pretrained(model, run_dir, taxonomy=mine, echo=False).heads_reinitialised == ("binary",)
    # without the model's taxonomy only names and shapes can be compared: the head loads
    model = tiny(mine)
    assert load_pretrained(model, run_dir, echo=False).heads_loaded == ("binary",)
    assert_same(model, donor, prefix="heads.")


def test_head_of_another_shape_is_skipped_with_a_note(tmp_path):
    donor = tiny(ALL, seed=8)
    save_file(donor.state_dict(), str(tmp_path / "w.safetensors"))
    four = {"binary": 2, "subtype": 4}
    model = tiny(four)
    record = load_pretrained(model, tmp_path / "w.safetensors", echo=False)
    assert record.heads_loaded == ("binary",) and record.heads_reinitialised == ("subtype",)
    assert "subtype: another shape in the source" in record.heads_note
    assert record.skipped == ("heads.subtype.3.weight", "heads.subtype.3.bias")
    assert record.loaded == record.total
    assert_same(model, donor, prefix="heads.binary.")
    assert not torch.equal(
        model.state_dict()["heads.subtype.0.weight"], donor.state_dict()["heads.subtype.0.weight"]
    )


# --------------------------------------------------------------------------- refusal and its override


def test_backbone_of_another_shape_is_refused_unless_allowed(tmp_path, capsys):
    donor = vgg_net(widths=(8, 32))  # same keys, wider second block
    path = tmp_path / "wide.safetensors"
    save_file(donor.state_dict(), str(path))
    model = vgg_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError, match="does not match backbone tiny_vgg") as e:
        load_pretrained(model, path)
    msg = str(e.value)
    assert isinstance(e.value, BccError) and "\n" not in msg and str(path) in msg
    assert "backbone.features.4.weight (source (32, 8, 3, 3), model (16, 8, 3, 3))" in msg
    assert "pretrained_allow_mismatch" in msg
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched
    assert capsys.readouterr().out == ""

    record = load_pretrained(model, path, allow_mismatch=True)
    assert record.loaded == 6 and record.total == 12  # the first block fits, the second does not
    assert_same(model, donor, prefix="backbone.features.0.")
    assert "backbone.features.4.weight" in record.skipped
    assert not set(record.skipped) & set(record.missing)  # listed once, under skipped
    assert "num_batches_tracked" not in " ".join(record.skipped)
    line = capsys.readouterr().out
    assert (
        line.startswith(f"pretrained: 6 of 12 backbone tensors loaded from {path}")
        and "skipped (other shape)" in line
    )


def test_names_that_all_match_with_other_shapes_are_said_so(tmp_path):
    path = tmp_path / "wider.safetensors"
    save_file(vgg_net(widths=(16, 32)).state_dict(), str(path))  # every backbone tensor of another shape
    with pytest.raises(PretrainedError) as e:
        load_pretrained(vgg_net(), path, echo=False)
    msg = str(e.value)
    assert "12 of 12 keys match by name but differ in shape" in msg and "num_batches_tracked" not in msg
    assert "backbone.features.0.weight (source (16, 3, 3, 3), model (8, 3, 3, 3))" in msg


def test_missing_backbone_tensors_are_refused_unless_allowed(tmp_path):
    donor = timm.create_model(TINY, num_classes=0).state_dict()
    cut = {k: v for k, v in donor.items() if not k.startswith("layer4.")}
    torch.save(cut, tmp_path / "cut.pt")
    model = tiny()
    with pytest.raises(PretrainedError, match=r"tensors missing: backbone\.layer4\."):
        load_pretrained(model, tmp_path / "cut.pt")
    record = load_pretrained(model, tmp_path / "cut.pt", allow_mismatch=True, echo=False)
    assert 0 < record.loaded < record.total and all(
        k.startswith("backbone.layer4.") for k in record.missing_backbone
    )
    assert "missing (left random): backbone.layer4." in record.line() and "(+" in record.line()  # abbreviated


def test_source_trained_as_another_backbone_is_refused(tmp_path, run):
    model = tiny(backbone="resnet10t")  # a bcc run of test_resnet into a resnet10t: nothing fits anyway
    with pytest.raises(PretrainedError, match="no tensor fits backbone resnet10t: .* keys match by name but differ"):
        load_pretrained(model, run.dir, allow_mismatch=True)
    # same tensors, but the run says it trained another backbone: refused, allowed on request
    donor = vgg_net()
    cfg = Config(model=ModelConfig(backbone="vgg16_bn", head_hidden=HIDDEN))
    meta = {"taxonomy": ALL.to_dict(), "model": config_to_dict(cfg.model), "config": config_to_dict(cfg)}
    manager = CheckpointManager(
        tmp_path / "r" / "checkpoints", keep_last=1, keep_top_k=1, metric="m", mode="max"
    )
    manager.save(
        Checkpoint(
            model=donor.state_dict(), optimizer={}, scaler=None, rng=[], state=TrainState(step=1), meta=meta
        ),
        1.0,
    )
    with pytest.raises(PretrainedError, match="trained as backbone vgg16_bn, the model is tiny_vgg"):
        load_pretrained(vgg_net(), tmp_path / "r")
    assert load_pretrained(vgg_net(), tmp_path / "r", allow_mismatch=True, echo=False).loaded == 12


def test_build_model_keeps_the_record_and_reads_allow_mismatch_from_the_config(tmp_path):
    donor = timm.create_model(TINY, num_classes=0).state_dict()
    torch.save({k: v for k, v in donor.items() if not k.startswith("layer4.")}, tmp_path / "cut.pt")
    cfg = SimpleNamespace(
        backbone=TINY,
        pretrained=str(tmp_path / "cut.pt"),
        head_hidden=HIDDEN,
        head_dropout=0.0,
        channels_last=False,
    )
    with pytest.raises(PretrainedError):
        build_model(cfg, ALL.head_sizes)
    model = build_model(SimpleNamespace(**vars(cfg), pretrained_allow_mismatch=True), ALL.head_sizes)
    assert model.pretrained_record.loaded < model.pretrained_record.total
    assert tiny().pretrained_record is None


# --------------------------------------------------------------------------- bad sources: one named error


def _bad_sources(tmp_path):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00not a weights file" * 10)
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 truncated zip" * 10)
    (tmp_path / "truncated.pt").write_bytes(b"\x80\x02}q\x00")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage, not a pickle")
    (tmp_path / "notes.json").write_text('{"a": 1}')
    (tmp_path / "image.jpg").write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "hparams.pt")
    torch.save({}, tmp_path / "empty.pt")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "run_without_checkpoints" / "checkpoints").mkdir(parents=True)
    (tmp_path / "bad_export").mkdir()
    (tmp_path / "bad_export" / "bcc_export.json").write_text('{"format": "other"}')
    return {
        "missing.safetensors": "no such file or directory",
        "corrupt.safetensors": "cannot load it",
        "corrupt.pth": "not a loadable weights file",
        "truncated.pt": "not a loadable weights file",
        "garbage.pt": "not a loadable weights file (a damaged pickle, or one holding more than tensors: Unsupported",
        "notes.json": "not a weights file",
        "image.jpg": "not a weights file",
        "list.pt": "holds a list, not a state dict",
        "hparams.pt": "entry 'epoch' is a int, not a tensor",
        "empty.pt": "the state dict is empty",
        "empty_dir": "neither a bcc run, checkpoint or export",
        "run_without_checkpoints": "neither a bcc run, checkpoint or export",
        "bad_export": "is not a bcc-export/1 export",
    }


def test_every_bad_source_is_one_named_error(tmp_path):
    for name, reason in _bad_sources(tmp_path).items():
        with pytest.raises(PretrainedError) as e:
            load_pretrained(tiny(), tmp_path / name, echo=False)
        msg = str(e.value)
        # never PyTorch's advice to retry with weights_only=False: that would run an untrusted file's code
        assert isinstance(e.value, BccError) and name in msg and reason in msg and "\n" not in msg and (
            "weights_only=False" not in msg and "weights_only` set to `False" not in msg), (
            name,
            msg,
        )


def test_hub_failure_names_the_offline_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    model = tiny()
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedError, match="model.pretrained=/path/to/file") as e:
        load_pretrained(model, "hub")
    assert TINY in str(e.value) and "network is unreachable" in str(e.value) and "\n" not in str(e.value)


def test_hub_weights_report_timm_pretrained_cfg(monkeypatch):
    real, model = timm.create_model, tiny()
    monkeypatch.setattr(
        timm, "create_model", lambda name, pretrained, **kw: real(name, pretrained=False, **kw)
    )
    record = load_pretrained(model, "hub", echo=False)
    assert record.kind == "hub" and record.loaded == record.total and len(record.sha256) == 64
    assert record.preprocess.mean == (0.5, 0.5, 0.5) and record.preprocess.image_size == 160


def test_timm_model_folder_reads_its_pretrained_cfg(tmp_path):
    donor = timm.create_model(TINY, num_classes=0)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(donor.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architecture": TINY,
                "pretrained_cfg": {
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.25, 0.25, 0.25],
                    "input_size": [3, 96, 96],
                    "crop_pct": 0.9,
                },
            }
        )
    )
    model = tiny()
    record = load_pretrained(model, folder, echo=False)
    assert record.kind == "hf-folder" and record.loaded == record.total
    assert record.preprocess == SourcePreprocess(
        (0.5,) * 3, (0.25,) * 3, 96, 0.9, "timm pretrained_cfg (config.json)"
    )


# --------------------------------------------------------------------------- following the source


def test_resolve_source_reads_metadata_only(run):
    src = resolve_source(run.dir)
    assert src.kind == "run" and src.backbone == TINY and src.taxonomy == ALL.to_dict()
    assert src.preprocess.image_size == 48


def test_follow_source_keeps_what_the_user_set(tmp_path):
    pre = SourcePreprocess((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 48, None, "bcc checkpoint config")
    data, changes = follow_source(DataConfig(), pre)
    assert (data.mean, data.std, data.image_size, data.crop_pct) == (
        (0.1, 0.2, 0.3),
        (0.4, 0.5, 0.6),
        48,
        1.0,
    )
    assert set(changes) == {"mean", "std", "image_size"} and changes["image_size"] == (224, 48)

    config = tmp_path / "c.yaml"
    config.write_text("data:\n  image_size: 64\nmodel:\n  pretrained: runs/wbc\n")
    explicit = explicit_keys(config, ["data.mean=[0.5, 0.5, 0.5]", "train.lr=0.1"])
    assert {"data.image_size", "data.mean", "model.pretrained", "train.lr"} <= explicit
    data, changes = follow_source(dataclasses.replace(DataConfig(), image_size=64), pre, explicit)
    assert data.image_size == 64 and data.mean == DataConfig().mean and data.std == (0.4, 0.5, 0.6)
    assert set(changes) == {"std"}


def test_follow_pretrained_takes_the_runs_preprocessing_before_anything_is_built(run):
    cfg = Config(model=ModelConfig(backbone=TINY, pretrained=str(run.dir)))
    followed, changes = follow_pretrained(cfg, explicit={"data.image_size"})
    assert followed.data.mean == (0.1, 0.2, 0.3) and followed.data.crop_pct == 0.875
    assert followed.data.image_size == cfg.data.image_size  # the user set it
    assert changes["data.std"] == (cfg.data.std, (0.4, 0.5, 0.6))
    assert follow_pretrained(Config()) == (Config(), {})


def test_hub_preprocessing_is_known_without_a_download():
    vgg = resolve_source("hub", "vgg16_bn").preprocess
    assert vgg.mean == (0.485, 0.456, 0.406) and vgg.image_size == 224 and vgg.crop_pct == 224 / 256
    assert resolve_source("hub", "resnet10t").preprocess.image_size == 176  # timm's default tag
    assert resolve_source("hub", "no_such_net").preprocess == SourcePreprocess()


# --------------------------------------------------------------------------- through the trainer


def test_build_components_gives_the_model_its_taxonomy(tmp_path):
    from bcc.train.setup import build_components

    other = Taxonomy.from_dict({"name": "other", "heads": [{"name": "binary", "labels": ["x", "y"]}]})
    mine = Taxonomy.from_dict(
        {"name": "mine", "heads": [{"name": "binary", "labels": ["Benign", "Malignant"]}]}
    )
    run_dir = make_run(tmp_path / "run", [(tiny(other, seed=7), 0.8)], taxonomy=other)
    model_cfg = ModelConfig(backbone=TINY, pretrained=str(run_dir), head_hidden=HIDDEN, head_dropout=0.0)
    cfg = Config(model=model_cfg)
    parts = build_components(cfg, mine, {"Benign": 1, "Malignant": 1}, torch.device("cpu"))
    # same head name and shape, other taxonomy: only the taxonomy can tell, so it must have been passed
    assert parts.model.pretrained_record.heads_reinitialised == ("binary",)
    resumed = build_components(cfg, mine, {"Benign": 1, "Malignant": 1}, torch.device("cpu"), pretrained=False)
    assert resumed.model.pretrained_record is None


def test_config_key_allow_mismatch_reaches_the_loader(tmp_path):
    from bcc.config import load_config

    state = tiny(ALL, seed=3).state_dict()
    del state["backbone.conv1.0.weight"]  # one backbone tensor missing: refused unless allowed
    save_file(state, str(tmp_path / "w.safetensors"))
    cfg = load_config(None, [f"model.backbone={TINY}", f"model.pretrained={tmp_path / 'w.safetensors'}"])
    assert cfg.model.pretrained_allow_mismatch is False
    with pytest.raises(PretrainedError):
        build_model(cfg.model, ALL.head_sizes, taxonomy=ALL)
    cfg = load_config(None, [f"model.backbone={TINY}", f"model.pretrained={tmp_path / 'w.safetensors'}",
                             "model.pretrained_allow_mismatch=true"])
    assert build_model(cfg.model, ALL.head_sizes, taxonomy=ALL).pretrained_record.loaded >= 1


def test_training_from_a_run_prints_the_load_line(run, synth_shards, tmp_path):
    import subprocess
    import sys

    from conftest import write_config

    cfg = write_config(
        tmp_path / "cfg.yaml", synth_shards, tmp_path / "run", model={"pretrained": str(run.dir)}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bcc.train", "--config", str(cfg), "train.epochs=1", "eval.test_at_end=false"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("pretrained: ")]
    total = len(backbone_tensors(tiny()))
    # the run's heads have 16 hidden units, this config's 256: the backbone transfers, the heads start afresh
    assert line.startswith(f"pretrained: {total} of {total} backbone tensors loaded from {run.dir} (sha256 ")
    assert "heads re-initialised: binary, subtype" in line


def test_a_bad_pretrained_file_ends_training_with_one_error_line(synth_shards, tmp_path, bcc_main):
    from conftest import write_config

    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04 not a zip")
    cfg = write_config(
        tmp_path / "cfg.yaml", synth_shards, tmp_path / "run", model={"pretrained": str(tmp_path / "w.pt")}
    )
    proc = bcc_main("train", "--config", cfg)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (f"error: pretrained weights {tmp_path / 'w.pt'}: not a loadable weights file (RuntimeError: "
            "PytorchStreamReader failed reading zip archive: not a ZIP archive; bcc loads") in proc.stderr


def test_a_run_follows_records_and_resumes_without_its_source(run, synth_shards, tmp_path):
    """Normalisation follows the source (the YAML's image_size stays), the record lands in
    RUN/pretrained.json and every checkpoint's meta, and a resume neither needs nor re-reads the source."""
    import shutil
    import subprocess
    import sys

    import yaml

    from bcc.checkpoint import find_latest, read_meta
    from bcc.config import config_from_dict

    from conftest import write_config

    source = tmp_path / "source"
    shutil.copytree(run.dir, source, symlinks=True)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, out, model={"pretrained": str(source)})

    def train(*overrides):
        return subprocess.run(
            [sys.executable, "-m", "bcc.train", "--config", str(cfg), "eval.test_at_end=false", *overrides],
            capture_output=True, text=True, timeout=400,
        )

    proc = train("train.epochs=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data.mean: (0.485, 0.456, 0.406) -> (0.1, 0.2, 0.3), as the pretrained source" in proc.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert saved["mean"] == [0.1, 0.2, 0.3] and saved["std"] == [0.4, 0.5, 0.6] and saved["crop_pct"] == 0.875
    assert saved["image_size"] == 32  # set in the YAML: the user's value wins
    record = json.loads((out / "pretrained.json").read_text())
    weights = source / "checkpoints" / "step-00000002" / "model.safetensors"
    assert record["source"] == str(source) and record["kind"] == "run"
    assert record["sha256"] == sha(weights) and record["loaded"] == record["total"] > 0
    first = find_latest(out / "checkpoints")
    assert read_meta(first)["pretrained"] == record

    shutil.move(source, tmp_path / "moved")  # the source is gone: resuming must not need it
    proc = train("train.epochs=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "pretrained: " not in proc.stdout
    second = find_latest(out / "checkpoints")
    assert second != first and read_meta(second)["pretrained"] == record
    assert config_from_dict(read_meta(second)["config"]).data.mean == (0.1, 0.2, 0.3)
    assert json.loads((out / "pretrained.json").read_text()) == record


def test_negative_batchnorm_variance_ends_training_with_one_error_line(synth_shards, tmp_path, bcc_main):
    """A source whose BatchNorm running_var holds a negative value loaded without a word and gave NaN
    outputs in eval mode (issue-14 re-breaker); NaN/Inf were refused already. One error line naming the
    file and the tensor key, before anything trains."""
    from conftest import write_config

    state = tiny(seed=3).state_dict()
    key = next(k for k in state if k.startswith("backbone.") and k.endswith("running_var"))
    state[key] = state[key].clone()
    state[key][0] = -0.5
    torch.save(state, tmp_path / "neg.pth")
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run",
                       model={"pretrained": str(tmp_path / "neg.pth")})
    proc = bcc_main("train", "--config", cfg)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and message.count("error:") == 1
    assert (f"error: pretrained source {tmp_path / 'neg.pth'}: BatchNorm tensor {key} holds negative variances "
            "(min -0.5); they give NaN outputs in eval mode") in message
    assert not (tmp_path / "run" / "checkpoints").exists()
