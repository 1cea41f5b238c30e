"""The loop state a checkpoint restores first: `TrainState` (counters, stage, best metric, top-k) and
every RNG (torch, CUDA, Python, NumPy) in a form `torch.load(weights_only=True)` accepts.

Storage (files, atomic directories, `find_latest`, retention) is `bcc.checkpoint`'s; this module only
says what the state is and how it round-trips.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TrainState", "restore_rng_state", "save_rng_state"]


@dataclass
class TrainState:
    """The loop state: goes into every checkpoint (`trainer_state.json`) and is restored first."""

    epoch: int = 0  # current epoch, 0-based
    step: int = 0  # optimizer steps done (global)
    batches_in_epoch: int = 0  # batches consumed in the current epoch (0 at an epoch boundary)
    samples_seen: int = 0
    stage: int = 0  # index of the current unfreezing stage
    trainable: list[str] = field(default_factory=list)  # parameter groups trainable in this stage
    best_metric: float | None = None
    best_step: int | None = None
    top_k: list[dict] = field(default_factory=list)  # [{"step", "metric", "name"}], best first
    config_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        """Build from `to_dict` output. Unknown keys are an error; missing keys take their defaults."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(
                f"unknown TrainState key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(names)}"
            )
        state = cls(**{k: d[k] for k in names if k in d})
        for name in ("epoch", "step", "batches_in_epoch", "samples_seen", "stage"):
            value = getattr(state, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainState.{name} must be a non-negative integer, got {value!r}")
        if state.best_metric is not None:
            state.best_metric = float(state.best_metric)
        state.trainable = [str(x) for x in state.trainable]
        for entry in state.top_k:
            if not isinstance(entry, Mapping) or not {"step", "metric", "name"} <= set(entry):
                raise ValueError(f"TrainState.top_k entries need step, metric and name; got {entry!r}")
        state.top_k = [dict(e) for e in state.top_k]
        return state


# --------------------------------------------------------------------------- RNG


def save_rng_state() -> dict:
    """This process's RNG states, in a form `torch.load(weights_only=True)` accepts."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "kind": str(kind),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def restore_rng_state(d: Mapping[str, Any]) -> None:
    """Restore what `save_rng_state` returned (CUDA states only where CUDA is available)."""
    import numpy as np

    torch.set_rng_state(d["torch"].cpu())
    cuda = d.get("cuda") or []
    if cuda and torch.cuda.is_available():
        # a resume on fewer visible devices restores those it has
        for device, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), device)
    version, internal, gauss_next = d["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    n = d["numpy"]
    np.random.set_state(
        (
            n["kind"],
            np.asarray(n["keys"], dtype=np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
