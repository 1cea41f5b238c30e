"""Experiment trackers (`run.report_to`) through Accelerate's tracker integration, kept in the run directory.

`metrics.jsonl` is always written (bcc.train.runlog); `run.report_to` adds any of:

    tensorboard  event files under RUN/bcc/ (`tensorboard --logdir RUN`)
    wandb        W&B, offline by default: RUN/wandb/offline-run-*/ (`wandb sync RUN/wandb/offline-run-*`);
                 set WANDB_MODE=online to stream instead
    mlflow       an MLflow file store under RUN/mlruns (`mlflow ui --backend-store-uri RUN/mlruns`), or
                 the server in MLFLOW_TRACKING_URI when set

The project (W&B project, MLflow experiment, TensorBoard sub-directory) is "bcc"; `run.name` names the
tracker run. Hyperparameters are the flattened config (`train.lr`, `data.batch_size`, ...), stored once
per tracker when it first starts in a run directory. Only the main process talks to trackers.

A requeued run continues the same tracker run: `trackers.json` in the run directory keeps the W&B run id
and the MLflow run id, which the resumed process reuses; TensorBoard writes to the same directory with
`purge_step` at the resumed step + 1, so a reader drops whatever an interrupted process logged after the
checkpoint it resumes from. After a clean preemption nothing is logged twice; after a hard kill the steps
between the last checkpoint and the kill are trained again and MLflow (which never deletes a point) shows
those steps twice, W&B online keeps the first values (it ignores steps below its current one), and each W&B
offline attempt is its own `offline-run-*` directory with the same id (sync them in order).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bcc.atomic import write_json
from bcc.errors import BccError

# run.report_to name -> the module that must be importable (Accelerate uses these names too)
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "bcc"
STATE_FILE = "trackers.json"  # per tracker, what a resumed process needs to continue the same tracker run
EXTRA_HINT = "pip install 'bcc[trackers]'"


class TrackerError(BccError):
    """A tracker asked for in `run.report_to` that cannot run (package missing)."""


def require_trackers(names: Sequence[str]) -> list[str]:
    """The tracker names of `run.report_to` (duplicates dropped), checked importable.

    Called before the Accelerator exists: Accelerate silently drops a tracker whose package is missing.
    Raises TrackerError naming the optional extra.
    """
    out: list[str] = []
    for name in names:
        if name not in TRACKER_MODULES:  # the config tree refuses these already; this guards other callers
            raise TrackerError(f"run.report_to: unknown tracker '{name}'; choose from {', '.join(TRACKER_MODULES)}")
        if name in out:
            continue
        if not _is_installed(TRACKER_MODULES[name]):
            raise TrackerError(f"run.report_to: {name} is not installed; it comes with the trackers extra: "
                               f"{EXTRA_HINT}")
        out.append(name)
    return out


def _is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent package
        return False


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config dict as dotted keys with scalar values (what every tracker accepts as a
    hyperparameter): lists, empty mappings and None become their JSON text."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def tracker_values(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as tracker metrics: numeric values under the row's split (`val/bacc`,
    `test/loss`), and its source when it has one (`val/SOURCE/bacc`, data.sources); `step` is the tracker
    step itself and strings (split, checkpoint) are dropped."""
    split = row.get("split", "train")
    if row.get("source"):
        split = f"{split}/{row['source']}"
    return {f"{split}/{k}": v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def start_trackers(accelerator, names: Sequence[str], run_dir: Path, run_name: str, config: Mapping[str, Any],
                   resumed_step: int) -> None:
    """`accelerator.init_trackers` for the run (main process only; the Accelerator was built with
    `log_with=names, project_dir=run_dir`). `resumed_step`: the step training continues after (the
    checkpoint's; 0 for a fresh run).

    Continues the tracker runs recorded in RUN/trackers.json and stores the flattened config in each
    tracker that starts in this run directory for the first time.
    """
    names = list(dict.fromkeys(names))
    if not names or not accelerator.is_main_process:
        return
    run_dir = Path(run_dir).resolve()
    state = read_state(run_dir)
    kwargs: dict[str, dict] = {}
    if "tensorboard" in names:
        # a reader drops events at this step and later written before it: what an attempt that died
        # after its last checkpoint (or before its first) logged is redone now
        kwargs["tensorboard"] = {"purge_step": resumed_step + 1}
    if "wandb" in names:
        wandb_id = state.get("wandb", {}).get("id") or secrets.token_hex(4)
        state["wandb"] = {**state.get("wandb", {}), "id": wandb_id}
        kwargs["wandb"] = {"name": run_name, "id": wandb_id, "resume": "allow", "dir": str(run_dir),
                           "mode": os.environ.get("WANDB_MODE", "offline")}
    if "mlflow" in names:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").as_uri()
            # MLflow 3 refuses a file store unless told; it is what needs no server and stays in the run dir
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        if state.get("mlflow", {}).get("uri") != uri:  # another tracking server: a new run there
            state["mlflow"] = {}
        kwargs["mlflow"] = {"run_name": run_name, **({"run_id": state["mlflow"]["run_id"]} if state["mlflow"] else {})}
    try:
        accelerator.init_trackers(PROJECT, config=None, init_kwargs=kwargs)
    except Exception as e:  # a tracker's own failure (unreachable server, bad URI): one line for the user
        raise TrackerError(f"run.report_to: could not start {', '.join(names)}: {type(e).__name__}: {e}") from e
    if "mlflow" in names:
        state["mlflow"] = {**state.get("mlflow", {}), "run_id": accelerator.get_tracker("mlflow", unwrap=True).info.run_id,
                           "uri": uri}
    hparams = flatten_config(config)
    for name in names:
        if not state.get(name, {}).get("config_logged"):
            accelerator.get_tracker(name, unwrap=False).store_init_configuration(hparams)
        state[name] = {**state.get(name, {}), "config_logged": True}
    write_json(run_dir / STATE_FILE, state)
