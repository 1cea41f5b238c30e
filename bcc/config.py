"""One typed config tree for every bcc run.

Defaults live here once. A YAML file overrides them, dotted command-line overrides
(`train.lr=0.003`) come last. Unknown keys and wrong types are errors that name the key and
suggest the closest valid one; the resolved tree is written into every run directory. The generic
machinery (YAML reading, override parsing, layer merging, the value rules) is `bcc/config_parse.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bcc.atomic import atomic_write
from bcc.config_parse import (
    MAX_SOURCE_WEIGHT,
    ConfigError,
    anchor_data_paths,
    blame,
    check_value,
    leaf_paths,
    merge_layers,
    nest,
    parse_override,
    read_yaml,
    suggest,
    type_name,
)

# Keys renamed since configs were first written. A config a user writes with the old key is refused
# (naming the new one); a config saved by an older bcc (run dir, checkpoint meta) is migrated on read.
RENAMED_KEYS = {"schedule": "finetune"}  # the unfreezing plan; "schedule" is the LR schedule elsewhere
RENAMED_METRICS = {"acc4": "acc", "bacc4": "bacc"}  # combined metrics no longer carry the class count


@dataclass(frozen=True)
class SourceConfig:
    """One packed dataset of `data.sources` (see DataConfig and README "Mixing sources")."""

    shards: str = ""  # a packed dataset: the same forms as data.shards (folder, URL, pipe: template)
    # data.sampling=without_replacement: an integer repeat factor (3: the source's train split passes 3
    # times per epoch, each sample at most 3 times); resample: a real-valued upsampling factor (a shard
    # is drawn with probability proportional to weight x its sample count)
    weight: float = 1.0
    name: str = ""  # names the source in metrics rows and logs; default: the last part of `shards`


@dataclass(frozen=True)
class DataConfig:
    # a packed dataset: a folder holding manifest.json, the http(s) URL of one (or of its manifest.json), or a
    # `pipe:COMMAND` template with {name} where the file name goes (`pipe:aws s3 cp s3://b/ds/{name} -`);
    # credentials from the environment only (BCC_HTTP_TOKEN, ~/.netrc, ${VAR}): docs/data.md
    shards: str = "shards/demo"
    # several packed datasets trained as one (instead of `shards`; setting both is an error); their
    # taxonomies must agree. Val and test are evaluated per source and combined (bcc/sources.py)
    sources: tuple[SourceConfig, ...] = ()
    # the same image (file or picture) in one source's train split and another's val/test split, found through
    # each pack's sample_index.npz: "error" refuses the run, "warn" says so and trains, "ignore" reads no index
    # (skips this check and the one against model.pretrained's training images)
    source_overlap: Literal["error", "warn", "ignore"] = "error"
    # without_replacement: an epoch is exactly one pass over the train split (times each source's
    # integer weight). resample: every (seed, epoch, rank, lane) draws shards with replacement, so any
    # number of shards feeds any number of ranks x workers; the epoch is `epoch_samples` long
    sampling: Literal["without_replacement", "resample"] = "without_replacement"
    epoch_samples: int = 0  # samples per epoch with sampling=resample; 0: the train split's size
    image_size: int = 224
    batch_size: int = 32  # per process
    eval_batch_size: int = 64  # per process
    workers: int = 2  # loader worker processes per rank
    shuffle_buffer: int = 500  # samples held by each of the 8 lanes of a rank (bcc.stream.LANES), not per worker
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # cross-validation (a pack made with --folds K): fold k validates, the other folds train; the val
    # split is then fold k of train+val and test is unchanged. None: the pack's own train/val split
    fold: int | None = None
    # a sample whose stored bytes fail their pack-time checksum (or do not decode): "error" stops the run
    # naming shard and key; "skip" leaves it out of its batch and reports it (see bcc/stream.py)
    on_corrupt: Literal["error", "skip"] = "error"
    # re-opens of a remote shard after a transient read error (dropped connection, failed pipe: command),
    # with backoff; a re-open skips forward to the sample that failed, so the sample order never changes
    retries: int = 3
    # seconds a remote read (an http(s) socket operation, a `pipe:` command's output) may go silent before it
    # counts as stalled: a transient error, retried as above
    read_timeout_s: float = 60.0
    # honour `pipe:` shard entries of the manifest (they run shell commands): only for a manifest you wrote
    allow_pipe_in_manifest: bool = False
    # train augmentation: blood smears have no canonical orientation, so both flips and rotation are safe
    # (crop and flips run in the loader workers on uint8; rotation, jitter, mean/std batched on the device)
    scale_min: float = 0.5
    rotation: float = 15.0
    hflip: bool = True
    vflip: bool = True
    color_jitter: float = 0.1
    crop_pct: float = 1.0  # eval: resize to image_size / crop_pct, then centre crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "vgg16_bn"  # torchvision vgg16_bn, or any timm model name
    # "" random init; "hub" the backbone's published weights (download); a bcc run dir (its best checkpoint),
    # checkpoints dir or checkpoint; a `bcc export` folder; a timm/HF model folder; a state-dict file
    # (.safetensors/.pt/.pth/.bin/.ckpt). The backbone transfers; data.mean/std/image_size/crop_pct
    # follow the source unless set in the config (bcc/pretrained.py)
    pretrained: str = ""
    pretrained_allow_mismatch: bool = False  # load what fits instead of refusing a backbone that differs
    head_hidden: int = 256
    head_dropout: float = 0.5
    # NHWC weights and batches (faster convolutions on tensor-core GPUs); auto: on CUDA unless
    # train.deterministic. Resolved once at start-up (bcc/train/accel.py); the checkpoint records the result
    channels_last: bool | Literal["auto"] = "auto"


@dataclass(frozen=True)
class LossConfig:
    head_weights: dict[str, float] = field(default_factory=dict)  # missing heads weigh 1.0
    class_weights: Literal["auto", "none"] = "auto"  # auto: inverse frequency of the train split
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01  # the source study's SGD learning rate
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_accum: int = 1
    clip_grad: float = 0.0  # max grad norm; 0 disables clipping
    # auto: bf16 on a CUDA GPU that has it, fp16 (with a loss scaler) on one that has not, no on CPU.
    # Resolved once at start-up and logged (bcc/train/accel.py); the checkpoint records the result
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0  # in [0, 2**32 - 1] (numpy's seed range); bcc compare --seeds N trains seed .. seed + N - 1
    # lr scaling with the global batch (batch_size x processes x grad_accum), timm's rule: train.lr is
    # the rate at lr_base_batch samples; linear: lr x global/base, sqrt: lr x sqrt(global/base); none: as given
    lr_scale: Literal["none", "linear", "sqrt"] = "none"
    lr_base_batch: int = 256
    # multiplier of the rate for the heads' parameters in every stage (times the stage's lr_mult). The
    # design's head reads 25,088 non-negative features: an SGD step moves each hidden unit by about
    # lr x |x|^2 ~ 35,000 x lr times its error, so from random backbone weights lr 0.01 kills its ReLUs
    # within ~10 steps (docs/transfer.md, "Why vgg16_bn stays at chance"); ~0.01 keeps them alive
    head_lr_mult: float = 1.0
    # GPU speed switches, each auto (on CUDA unless deterministic), true or false. Not bitwise reproducible:
    # cudnn.benchmark picks convolution algorithms by timing them, TF32 rounds fp32 matmuls/convolutions
    cudnn_benchmark: bool | Literal["auto"] = "auto"
    tf32: bool | Literal["auto"] = "auto"
    # deterministic algorithms (torch.use_deterministic_algorithms, cuDNN deterministic); turns the auto
    # switches above and model.channels_last off, and refuses them set to true
    deterministic: bool = False
    # torch.compile the DDP-wrapped model (Accelerate's TorchDynamoPlugin); one compile per stage
    compile: bool = False
    compile_backend: str = "inductor"  # a torch._dynamo backend: inductor, aot_eager, eager, cudagraphs...
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    sync_bn: bool = False  # BatchNorm statistics over all ranks (SyncBatchNorm; CUDA + NCCL only)
    ddp_static_graph: bool = False  # DDP static_graph: the graph is the same every step within a stage
    ddp_gradient_as_bucket_view: bool = False  # DDP gradients as views into the all-reduce buckets (less memory)
    # seconds a collective may wait for the other ranks before the process group fails the run (a dead,
    # stuck or failed rank ends the job within this bound instead of hanging it)
    timeout_s: float = 1800.0
    log_every: int = 10  # steps between progress updates
    # optimizer steps between preemption votes (an all-reduce over every rank; also one at each epoch end):
    # a signal is acted on within this many steps, then the run saves and exits
    preempt_check_steps: int = 10
    # exponential moving average of the weights (bcc/train/ema.py, timm's ModelEmaV3), updated after every
    # optimizer step, evaluated and checkpointed (model_ema.safetensors) beside the raw weights; its val and
    # test metrics are the `ema_*` columns, and checkpoint.metric=ema_bacc selects on them. None: no EMA
    ema_decay: float | None = None
    ema_warmup: bool = False  # decay ramps up as 1 - (1 + step)^(-2/3), capped at ema_decay (timm's warmup)


@dataclass(frozen=True)
class StageConfig:
    epochs: int = 1
    train: tuple[str, ...] = ("all",)  # parameter group names, or "all"
    lr_mult: dict[str, float] = field(default_factory=dict)  # group -> multiplier of train.lr
    warmup_steps: int | None = None  # None: train.warmup_steps


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning plan (which parameter groups train in which epochs); see bcc/finetune.py."""

    preset: Literal["frozen", "staged", "full", "lpft", "custom"] = "full"
    stages: tuple[StageConfig, ...] = ()  # given stages make the preset "custom"
    frozen_bn: Literal["eval", "train"] = "eval"


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: int = 1
    calibrate: bool = False  # fit temperature scaling on the val split after training
    # threshold of the root binary head fitted on val after training (bcc/operating_point.py):
    # argmax | youden | sensitivity>=X | specificity>=X (0 < X < 1); refused before training when the val split
    # (or fold) lacks either binary class, as its manifest counts tell
    operating_point: str = "argmax"
    test_at_end: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    resume: str = "auto"  # auto | none | PATH
    every_steps: int = 0  # 0: only at epoch ends and on preemption
    keep_last: int = 2
    keep_top_k: int = 1
    # tracked validation metric for best/top-k (a name of bcc.metrics.metric_names; `ema_<name>`, e.g. ema_bacc,
    # tracks the EMA weights' when train.ema_decay is set)
    metric: str = "bacc"
    mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"
    name: str = ""  # shown in the run header and summary.json (default: the run directory's name)
    # experiment trackers beside metrics.jsonl (bcc/trackers.py; `pip install 'bcc[trackers]'`)
    report_to: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = ()


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- building from dicts


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and "no" in args:
            value = "yes" if value else "no"  # YAML 1.1 reads a bare `no` as false
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
            # a lone string where a tuple of strings is expected reads naturally in YAML (`train: all`)
            if isinstance(value, str) and args and (args[0] is str or typing.get_origin(args[0]) is Literal):
                return (value,)
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads `3e-4` and `1e12` as strings, YAML 1.2 as numbers
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and key.endswith("pretrained"):
            return "hub" if value else ""  # `pretrained: true` reads naturally in YAML
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {type_name(tp)}")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if not prefix and key in RENAMED_KEYS and cls is Config:
            err = ConfigError(f"config key '{key}' is now '{RENAMED_KEYS[key]}'; rename it "
                              f"(e.g. {RENAMED_KEYS[key]}.preset=frozen)")
            err.key = str(key)  # so `load_config` names the file or override that used it
            raise err
        try:
            if key not in hints:
                raise ConfigError(f"unknown config key '{full}'{suggest(str(key), names)}")
            kwargs[key] = _coerce(value, hints[key], full)
            check_value(full, kwargs[key])
        except ConfigError as e:
            if e.key is None:  # the innermost key; `load_config` blames the layer that set it
                e.key = full
            raise
    if cls is DataConfig:
        _check_data(data, kwargs)
    return cls(**kwargs)



def _check_data(given: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """The rules of `data` that span keys: `sources` excludes `shards`, names are unique, weights fit
    `sampling`, `epoch_samples` needs resample. Raises ConfigError naming the key at fault."""

    def fail(key: str, message: str) -> None:
        err = ConfigError(f"{key}: {message}")
        err.key = key
        raise err

    sources = kwargs.get("sources", ())
    sampling = kwargs.get("sampling", DataConfig.sampling)
    if "sources" in given and not sources and given["sources"] is not None:  # [] would train on data.shards' default
        fail("data.sources", "is empty: list at least one packed dataset, or unset it (data.sources=null) to use "
                             "data.shards")
    if sources and "shards" in given:
        fail("data.sources", f"data.sources and data.shards ({given['shards']!r}) are exclusive: the sources "
                             "list every packed dataset; keep one (on the command line, data.shards=null or data.sources=null "
                             "unsets the one a config file set)")
    names: dict[str, int] = {}
    for i, src in enumerate(sources):
        if not src.shards:
            fail(f"data.sources[{i}].shards", "must name a packed dataset directory")
        if src.weight > MAX_SOURCE_WEIGHT:  # weight x count must stay a finite float (1e308 overflowed)
            fail(f"data.sources[{i}].weight", f"{src.weight:g} is above {MAX_SOURCE_WEIGHT:g}: a weight is a "
                 "repeat factor or a relative sampling weight; scale the weights down")
        if sampling == "without_replacement" and src.weight != int(src.weight):
            fail(f"data.sources[{i}].weight", f"{src.weight:g} is not an integer: with data.sampling="
                 "without_replacement a weight is a repeat factor (passes per epoch); set data.sampling=resample "
                 "for real-valued weights")
        name = source_name(src)
        if name in names:
            fail(f"data.sources[{i}].name", f"'{name}' also names data.sources[{names[name]}]; give each "
                 "source a distinct name")
        names[name] = i
    if kwargs.get("epoch_samples", 0) and sampling != "resample":
        fail("data.epoch_samples", "sets the epoch length of data.sampling=resample; without_replacement "
                                   "epochs are one pass over the train split")


def source_name(src: SourceConfig) -> str:
    """A source's name: `name`, else the last part of its `shards` path (`/data/all-224/` -> `all-224`)."""
    return src.name or Path(src.shards.rstrip("/")).name or src.shards


def _normalise(data: Mapping[str, Any]) -> dict[str, Any]:
    """Expand shortcuts: `finetune: frozen` means `finetune: {preset: frozen}`."""
    data = dict(data)
    plan = data.get("finetune")
    if isinstance(plan, str):
        data["finetune"] = {"preset": plan}
    elif isinstance(plan, Mapping) and plan.get("stages") and "preset" not in plan:
        data["finetune"] = {**plan, "preset": "custom"}
    return data


def migrate_saved(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict saved by an older bcc (run dir config.yaml, checkpoint meta) in today's names.

    Renames the keys of `RENAMED_KEYS` and a `checkpoint.metric` of `RENAMED_METRICS`; a current
    config comes back unchanged. Only for saved configs: a config a user writes is refused instead.
    """
    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old in data and new not in data:
            data[new] = data.pop(old)
    section = data.get("data")
    if isinstance(section, Mapping) and ("shards" in section and section.get("sources") or section.get("sources") == []):
        # written beside data.sources (the unused default, or an empty list) before bcc left them out
        data["data"] = {k: v for k, v in section.items() if k != ("shards" if section["sources"] else "sources")}
    ckpt = data.get("checkpoint")
    if isinstance(ckpt, Mapping) and ckpt.get("metric") in RENAMED_METRICS:
        data["checkpoint"] = {**ckpt, "metric": RENAMED_METRICS[ckpt["metric"]]}
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then dotted `key=value` overrides.

    Raises ConfigError whose message starts with the source of the bad key: the file's path or the
    override's text (`override 'train.lr=-1': train.lr: must be > 0, got -1`).
    """
    data: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}  # leaf key path -> the layer that set it last
    source = "config"
    try:
        layers: list[tuple[str, dict[str, Any]]] = []
        if path is not None:
            source = str(path)
            layers.append((source, _normalise(read_yaml(path))))
        for text in overrides:
            source = f"override '{text}'"
            keys, value = parse_override(text)
            layers.append((source, _normalise(nest(keys, value))))
        for source, layer in layers:
            data = merge_layers(data, layer)
            for leaf in leaf_paths(layer):
                origins.pop(leaf, None)
                origins[leaf] = source
        source = "config"
        return anchor_data_paths(_build(Config, data))  # a run's config.yaml names its data wherever read
    except ConfigError as e:
        where = blame(e.key, origins, source)
        raise (ConfigError(f"{where}: {e}") if not str(e).startswith(where) else e) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = plain(cfg)
    data = out.get("data") if isinstance(cfg, Config) else out if isinstance(cfg, DataConfig) else None
    if data and data.get("sources"):
        del data["shards"]  # unused beside data.sources, and exclusive with it when the file is read back
    elif data and "sources" in data:
        del data["sources"]  # none: `sources: []` read back would be an empty list given
    return out


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A saved config (checkpoint meta, `config_to_dict` output); older names are migrated."""
    data = _normalise(migrate_saved(data))
    if isinstance(data.get("data"), Mapping) and data["data"].get("sources"):
        # a saved config lists every key: `shards` is the unused default beside the sources
        data["data"] = {k: v for k, v in data["data"].items() if k != "shards"}
    return _build(Config, data)


def load_saved_config(path: str | Path) -> Config:
    """The config.yaml an earlier run wrote into its directory (older names migrated)."""
    try:
        return config_from_dict(read_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(config_to_yaml(cfg))


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every leaf that differs."""

    def leaves(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and v and not k.endswith(("weights", "lr_mult")):
                out.update(leaves(v, key + "."))
            else:
                out[key] = v
        return out

    a, b = leaves(config_to_dict(old)), leaves(config_to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
