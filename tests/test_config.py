import pytest
import yaml

from bcc.config import (
    Config,
    ConfigError,
    config_diff,
    config_from_dict,
    config_hash,
    load_config,
    load_saved_config,
    save_config,
)


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  epochs: 3\ndata:\n  image_size: 64\n")
    cfg = load_config(path, ["train.lr=0.003", "model.backbone=resnet18"])
    assert cfg.train.lr == 0.003  # override beats the file
    assert cfg.train.epochs == 3  # file beats the default
    assert cfg.data.image_size == 64
    assert cfg.model.backbone == "resnet18"
    assert cfg.train.momentum == Config().train.momentum  # untouched default


def test_unknown_key_names_it_and_suggests(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean 'lr'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*'train'"):
        load_config(None, ["trian.lr=0.1"])


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: 'fp8' is not one of"):
        load_config(None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match=r"data\.hflip: expected true/false"):
        load_config(write(tmp_path, "data: {hflip: 3}\n"))
    with pytest.raises(ConfigError, match=r"data\.mean: expected 3 values"):
        load_config(None, ["data.mean=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"data\.on_corrupt: 'ignore' is not one of 'error', 'skip'"):
        load_config(None, ["data.on_corrupt=ignore"])
    assert load_config(None, ["data.on_corrupt=skip"]).data.on_corrupt == "skip"
    assert load_config(None, []).data.on_corrupt == "error"


def test_bad_yaml_names_file(tmp_path):
    path = write(tmp_path, "train: [lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_finetune_shortcut_and_stages(tmp_path):
    assert load_config(None, ["finetune=frozen"]).finetune.preset == "frozen"
    path = write(
        tmp_path,
        "finetune:\n  stages:\n    - {epochs: 1, train: heads}\n"
        "    - {epochs: 2, train: [heads, block5], lr_mult: {block5: 0.1}, warmup_steps: 5}\n",
    )
    sched = load_config(path).finetune
    assert sched.preset == "custom"
    assert sched.stages[0].train == ("heads",)
    assert sched.stages[1].lr_mult == {"block5": 0.1} and sched.stages[1].warmup_steps == 5
    with pytest.raises(ConfigError, match=r"finetune\.stages\[0\]\.epochs"):
        load_config(None, ["finetune.stages=[{epochs: x}]"])


@pytest.mark.parametrize("override", ["schedule=frozen", "schedule.preset=staged", "schedule.frozen_bn=train"])
def test_old_schedule_key_is_refused_naming_finetune(override, tmp_path):
    with pytest.raises(ConfigError, match="'schedule' is now 'finetune'"):
        load_config(None, [override])
    with pytest.raises(ConfigError, match="'schedule' is now 'finetune'"):
        load_config(write(tmp_path, "schedule: {preset: frozen}\n"))


def test_saved_configs_of_older_runs_are_migrated(tmp_path):
    old = {"train": {"epochs": 3}, "schedule": {"preset": "staged", "stages": [], "frozen_bn": "train"},
           "checkpoint": {"metric": "bacc4"}}
    cfg = config_from_dict(old)  # as read from an old checkpoint's meta.json
    assert cfg.finetune.preset == "staged" and cfg.finetune.frozen_bn == "train"
    assert cfg.checkpoint.metric == "bacc"
    path = write(tmp_path, yaml.safe_dump(old))  # an old run dir's config.yaml
    assert load_saved_config(path) == cfg
    assert config_from_dict({"checkpoint": {"metric": "acc4"}}).checkpoint.metric == "acc"
    assert Config().checkpoint.metric == "bacc"


def test_bare_no_is_the_string_no():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def test_exponent_floats_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `3e-4` without a dot as a string; `lr: 3e-4` was refused as not a number."""
    assert load_config(write(tmp_path, "train: {lr: 3e-4, weight_decay: 5E-2}\n")).train.lr == 3e-4
    assert load_config(None, ["train.weight_decay=5E-2"]).train.weight_decay == 0.05
    assert load_config(None, ["train.timeout_s=1e3"]).train.timeout_s == 1000.0
    for bad in ("nan", "e5", "1e", "1e-"):
        with pytest.raises(ConfigError, match=rf"train\.lr: expected a number, got '{bad}'"):
            load_config(None, [f"train.lr={bad}"])

def test_pretrained_true_means_hub():
    assert load_config(None, ["model.pretrained=true"]).model.pretrained == "hub"
    assert load_config(None, ["model.pretrained=/w/vgg.safetensors"]).model.pretrained == "/w/vgg.safetensors"


def test_roundtrip_hash_and_diff(tmp_path):
    cfg = load_config(None, ["train.lr=0.5", "loss.head_weights={binary: 2.0}", "finetune=staged"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    other = config_from_dict({"train": {"lr": 0.5, "epochs": 20}, "loss": {"head_weights": {"binary": 2.0}},
                              "finetune": "staged"})
    assert config_diff(cfg, other) == {"train.epochs": (10, 20)}
    assert config_hash(other) != config_hash(cfg)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("seed", "ok"), [(0, True), (2**32 - 1, True), (-3, False), (2**32, False)])
def test_train_seed_must_fit_numpy(seed, ok):
    # numpy (accelerate's set_seed) refuses seeds outside [0, 2**32 - 1]: a traceback after set-up before
    if ok:
        assert load_config(None, [f"train.seed={seed}"]).train.seed == seed
    else:
        with pytest.raises(ConfigError, match=rf"train\.seed: must be in \[0, 4294967295\].*got {seed}$"):
            load_config(None, [f"train.seed={seed}"])


def test_bcc_train_refuses_a_bad_seed_in_one_line(tmp_path, bcc_main):
    proc = bcc_main("train", "--config", write(tmp_path, "train:\n  epochs: 1\n"), "train.seed=-3",
                    f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    err = proc.stderr
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: override 'train.seed=-3': train.seed: must be in [0, 4294967295] (2**32 - 1, numpy's seed range), "
        "got -3"] and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_saved_config_of_a_sources_run_is_a_config_again(tmp_path, synth_shards):
    """A run with data.sources saved the unused default data.shards beside them, so its config.yaml given
    to --config was refused as setting both (fourth breaker); a saved config that still holds both (older
    bcc) is read by resume and `bcc eval` as the sources it trained on."""
    from bcc.config import config_from_dict, config_to_dict, save_config

    cfg = load_config(None, [f"data.sources=[{{shards: {synth_shards}, name: a}}, {{shards: {synth_shards}, weight: 2}}]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert "shards: shards/demo" not in (tmp_path / "config.yaml").read_text()
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and config_to_dict(again) == config_to_dict(cfg)
    older = config_to_dict(cfg)
    older["data"]["shards"] = Config().data.shards
    assert config_from_dict(older) == cfg
    assert "shards" in config_to_dict(Config())["data"]  # a plain run keeps its data.shards


def test_a_files_data_shards_gives_way_to_data_sources_on_the_command_line(tmp_path, synth_shards, bcc_main):
    """`data.shards=null` unsets a config file's data.shards, so data.sources given on the command line is
    read (before: `expected a string, got None`, and `data.shards=` is `not empty`); data.sources=null the
    other way round. A config that still sets both is an error, which says how to unset one."""
    from conftest import write_config

    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run")
    gone = tmp_path / "gone"
    sources = f"data.sources=[{{shards: {synth_shards}, name: big}}, {{shards: {gone}, weight: 2}}]"
    proc = bcc_main("train", "--config", cfg, "data.shards=null", sources)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: no manifest at {gone}/manifest.json"), lines[0]  # the sources were read
    loaded = load_config(cfg, [sources, "data.shards=null"])  # in either order
    assert loaded.data.shards == Config().data.shards and [s.weight for s in loaded.data.sources] == [1, 2]
    for overrides, message in [([sources], r"data.sources and data.shards \(.*\) are exclusive: .* keep one \(on "
                                            r"the command line, data.shards=null or data.sources=null unsets"),
                               (["data.shards=null", sources, "data.shards=/x"], r"\('/x'\) are exclusive"),
                               (["data.shards="], r"data.shards: must be .*not empty; the override data.shards=null "
                                                  r"unsets it\), got ''")]:
        with pytest.raises(ConfigError, match=message):
            load_config(cfg, overrides)
    with_sources = write(tmp_path, f"data:\n  sources: [{{shards: {synth_shards}}}]\n", "sources.yaml")
    assert load_config(with_sources, ["data.sources=null", "data.shards=/y"]).data.shards == "/y"
    with pytest.raises(ConfigError, match="expected a number, got None"):
        load_config(None, ["train.lr=null"])  # any other key: null is a value, as before
    assert load_config(None, ["data.sources=null"]) == Config()  # unset where no layer set it: the default
    with pytest.raises(ConfigError, match=r"data.sources: is empty: list at least one packed dataset"):
        load_config(None, ["data.sources=[]"])  # trained on the default data.shards before
