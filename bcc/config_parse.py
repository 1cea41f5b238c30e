"""The generic machinery behind bcc.config: reading YAML, parsing `key=value` overrides, merging layers,
the value rules, and naming types, keys and the layer at fault in errors.

`bcc/config.py` owns the typed tree (the dataclasses and their defaults) and builds it with these;
`ConfigError` lives here so both can raise it and stays importable from bcc.config.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from bcc.errors import BccError

SEED_MAX = 2**32 - 1  # the largest train.seed: numpy's seeds are 32-bit


class ConfigError(BccError, ValueError):
    """A config file or override that does not fit the config tree; `key` is the dotted key at fault."""

    shared = "node"  # every rank of a machine reads the same file and overrides

    key: str | None = None


# --------------------------------------------------------------------------- value rules
# One table for every key whose type alone admits nonsense (a zero batch, a negative rate). Keys are
# dotted paths with list indices dropped (`finetune.stages.epochs`); enums are `Literal` types in bcc/config.py.


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: math.isfinite(v) and v >= low), f">= {low:g}"


def _positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: math.isfinite(v) and v > 0), "> 0"  # inf crashed int(weight), NaN-ed the lr


def _fraction(closed_high: bool = True) -> tuple[Callable[[Any], bool], str]:
    if closed_high:
        return (lambda v: 0 <= v <= 1), "in [0, 1]"
    return (lambda v: 0 <= v < 1), "in [0, 1)"


MAX_EPOCH_SAMPLES = 10**10  # data.epoch_samples
MAX_SOURCE_WEIGHT = 1e6  # data.sources[].weight: beyond this, weight x count stops being meaningful


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.shards": ((lambda v: v != ""), "a packed dataset: folder, URL or pipe: template (not empty; the "
                                         "override data.shards=null unsets it)"),
    "data.sources.shards": ((lambda v: v != ""), "a packed dataset: folder, URL or pipe: template (not empty)"),
    "data.sources.weight": ((lambda v: math.isfinite(v) and 0 < v <= MAX_SOURCE_WEIGHT), "> 0 and at most 1e6"),
    # an epoch of 10**10 samples is 11 days at 10,000 images/s; beyond, a typo (10**15 planned for ever)
    "data.epoch_samples": ((lambda v: 0 <= v <= MAX_EPOCH_SAMPLES), f">= 0 and at most {MAX_EPOCH_SAMPLES:,} (10**10)"),
    "data.image_size": _positive(),
    "data.batch_size": _positive(),
    "data.eval_batch_size": _positive(),
    "data.workers": _at_least(0),
    "data.shuffle_buffer": _at_least(0),
    "data.retries": _at_least(0),
    # select() and socket time-outs overflow on huge values; a day is beyond any stall worth waiting out
    "data.read_timeout_s": ((lambda v: 0 < v <= 86_400), "in (0, 86400] seconds (> 0, at most a day)"),
    "data.scale_min": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "data.rotation": ((lambda v: 0 <= v <= 180), "in [0, 180] degrees"),
    "data.color_jitter": _at_least(0),
    "data.crop_pct": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "data.std": ((lambda v: all(x > 0 for x in v)), "> 0 for every channel"),
    "model.backbone": ((lambda v: v != ""), "a backbone name (not empty)"),
    "model.head_hidden": _positive(),
    "model.head_dropout": _fraction(closed_high=False),
    "loss.head_weights": ((lambda v: all(x >= 0 for x in v.values())), ">= 0 for every head"),
    "loss.label_smoothing": _fraction(closed_high=False),
    "train.epochs": _at_least(1),
    "train.lr": _positive(),
    "train.head_lr_mult": _positive(),
    "train.momentum": _fraction(closed_high=False),
    "train.weight_decay": _at_least(0),
    "train.warmup_steps": _at_least(0),
    "train.min_lr_ratio": _fraction(),
    "train.grad_accum": _at_least(1),
    "train.clip_grad": _at_least(0),
    "train.log_every": _at_least(1),
    "train.preempt_check_steps": _at_least(1),
    "train.lr_base_batch": _positive(),
    # numpy (accelerate's set_seed, the data order) takes seeds in [0, 2**32 - 1] only
    "train.seed": ((lambda v: 0 <= v <= SEED_MAX), f"in [0, {SEED_MAX}] (2**32 - 1, numpy's seed range)"),
    "train.compile_backend": ((lambda v: v != ""), "a torch._dynamo backend name (not empty)"),
    # timedelta and the process groups' millisecond clocks overflow on inf/huge values; under 1 s no collective fits
    "train.timeout_s": ((lambda v: 1 <= v <= 31_536_000), "in [1, 31536000] seconds (1 s to a year)"),
    "train.ema_decay": ((lambda v: v is None or 0 < v < 1), "in (0, 1), or null for no EMA"),
    "finetune.stages.epochs": _at_least(1),
    "finetune.stages.lr_mult": ((lambda v: all(x >= 0 for x in v.values())), ">= 0 for every group"),
    "finetune.stages.warmup_steps": ((lambda v: v is None or v >= 0), ">= 0"),
    "eval.every_epochs": _at_least(1),
    "eval.operating_point": ((lambda v: _is_operating_point(v)),
                             "argmax, youden, sensitivity>=X or specificity>=X with 0 < X < 1"),
    "checkpoint.every_steps": _at_least(0),
    "checkpoint.keep_last": _at_least(1),
    "checkpoint.keep_top_k": _at_least(0),
    "checkpoint.metric": ((lambda v: v != ""), "a metric name (not empty)"),
}


def _is_operating_point(text: Any) -> bool:
    from bcc.operating_point import OperatingPointError, parse_operating_point  # the one parser of the rule

    try:
        parse_operating_point(text)
    except OperatingPointError:
        return False
    return True


def check_value(key: str, value: Any) -> None:
    rule = _RULES.get(re.sub(r"\[\d+\]", "", key))
    if rule is not None and not rule[0](value):
        raise ConfigError(f"{key}: must be {rule[1]}, got {value!r}")


# --------------------------------------------------------------------------- keys, types, layers


def suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # `bool | Literal["auto"]` -> "bool or 'auto'"
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return ", ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# Keys an override `KEY=null` unsets (back to the default) instead of setting: the two exclusive ways to name
# the data, so that a config file's data.shards can give way to data.sources on the command line (and back).
UNSETTABLE = ("data.shards", "data.sources")
UNSET = object()  # the value of such an override: `merge_layers` drops the key


def merge_layers(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if value is UNSET:
            out.pop(key, None)
        elif isinstance(value, Mapping):  # into what is there, or nothing: an UNSET inside is dropped either way
            out[key] = merge_layers(out[key] if isinstance(out.get(key), Mapping) else {}, value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.003` -> (['train', 'lr'], 0.003); the value is parsed as YAML, except a `pipe:COMMAND`,
    kept as the string it is; `null` for a key of UNSETTABLE is UNSET."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.lr=0.003)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    if "[" in key:
        listed = key.split("[", 1)[0]
        raise ConfigError(f"override '{text}': one item of a list cannot be set on its own; give the whole list "
                          f"as YAML, e.g. {listed}='[{{shards: A}}, {{shards: B, weight: 3}}]'")
    if raw.startswith("pipe:"):  # a shell command stays as written (YAML would read `a: b` in it as a map)
        return key.split("."), raw
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return key.split("."), UNSET if value is None and key in UNSETTABLE else value


def nest(path: list[str], value: Any) -> dict[str, Any]:
    for part in reversed(path):
        value = {part: value}
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    return dict(data)


def leaf_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in data.items():
        path = (*prefix, str(k))
        out += leaf_paths(v, path) if isinstance(v, Mapping) and v else [path]
    return out


def blame(key: str | None, origins: Mapping[tuple[str, ...], str], default: str) -> str:
    """The source (file path or override text) that last set `key` or a key above or below it."""
    if key is None:
        return default
    path = tuple(p for p in re.sub(r"\[\d+\]", "", key).split(".") if p)
    hits = [src for p, src in origins.items()  # insertion order: later layers come last
            if p[:len(path)] == path or path[:len(p)] == p]
    return hits[-1] if hits else default


def anchor_path(location: str) -> str:
    """`location` (a `data.shards` or `data.sources[].shards` value) made absolute when it names an existing
    local path relative to the current directory (`os.path.abspath`: symlinks kept; a brace list when its
    folder exists), so a run's config.yaml names the pack it trained on wherever a later command runs (`bcc
    report RUN` from another directory read another pack of the same name). Left as written: URLs, `pipe:`,
    `~` and `${VAR}` forms, and paths that do not exist (the errors then name what the user wrote)."""
    import os

    from bcc.remote import is_local

    if not location or os.path.isabs(location) or location.startswith("~") or "$" in location \
            or not is_local(location):
        return location
    there = os.path.exists(location) or ("{" in location and os.path.isdir(os.path.dirname(location) or "."))
    return os.path.abspath(location) if there else location


def anchor_data_paths(cfg: Any) -> Any:
    """`cfg` (a bcc.config.Config) with its local data locations made absolute (`anchor_path`)."""
    import dataclasses

    d = cfg.data
    sources = tuple(dataclasses.replace(s, shards=anchor_path(s.shards)) for s in d.sources)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, shards=anchor_path(d.shards), sources=sources))
