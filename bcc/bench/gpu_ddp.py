"""The GPU check's DDP parts (`bench.gpu`'s nccl, gloo and sync_bn): `run_ranks` starts `_rank_main` in
`world_size` processes (spawned on CUDA, forked on the CPU; so `_rank_main` stays a top-level function),
each rank runs `_ddp_step` (one DDP step of the plan's model on a batch whose masked heads have no target,
optionally with SyncBatchNorm), rank 0 writes the result, and the parent kills ranks that have not ended
within the plan's hang bound (`rank_timeout_s + rank_startup_s`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bcc.bench import BenchError
from bcc.bench.gpu_plan import GpuPlan, _default_taxonomy, _device_batch, _error, _step_config
from bcc.bench.step import time_steps


def _masked_labels(taxonomy) -> tuple[list[int], list[str]]:
    """Leaf classes whose targets leave some head masked (-1; Benign: no subtype), and those heads."""
    table = taxonomy.target_table()
    rows = [i for i in range(table.shape[0]) if bool((table[i] < 0).any())]
    if not rows:
        raise BenchError("the taxonomy has no class that masks a head")
    heads = [h for j, h in enumerate(taxonomy.head_names) if bool((table[rows, j] < 0).all())]
    return rows, heads


def _ddp_step(spec: dict, device: torch.device, rank: int, sync_bn: bool) -> dict:
    """Two DDP steps (the first untimed) of the plan's model on a batch without malignant samples; the
    result holds the per-head losses, whether the masked heads' losses are 0 and whether the ranks'
    weights agree afterwards."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bcc.config import FinetuneConfig
    from bcc.train.setup import build_components, make_optimizer

    plan = GpuPlan(**spec["plan"])
    cfg = _step_config(plan)
    taxonomy, counts = _default_taxonomy()
    labels, masked = _masked_labels(taxonomy)
    parts = build_components(cfg, taxonomy, counts, device, finetune=FinetuneConfig(preset="full"))
    model = parts.model.to(device)
    converted = 0
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        converted = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    model.train()
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(cfg, [{"params": [p for p in model.parameters() if p.requires_grad]}])
    # each rank its own batch (seeded by rank): the all-reduce has something to average
    batch = _device_batch(plan.batch_sizes[0], plan.image_size, device, False, labels, seed=rank)
    last: dict = {}

    def step() -> None:
        loss, per_head = parts.loss_fn(ddp(batch["image"]), parts.targets_of(batch["label"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last.update(loss=loss, per_head=per_head)

    seconds = time_steps(step, steps=1, warmup=1, device=device)  # the one step timer (bcc.bench.step)
    loss, per_head = last["loss"], last["per_head"]
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    fingerprint = torch.stack([flat.sum(), (flat * flat).sum()])
    if dist.get_backend() == "gloo":
        fingerprint = fingerprint.cpu()  # gloo's MIN/MAX of doubles: certain on the host
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    losses = {h: float(v) for h, v in per_head.items()}
    return {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "device": str(device),
            "batch_size": plan.batch_sizes[0], "labels": [taxonomy.class_names[i] for i in labels],
            "masked_heads": masked, "head_losses": losses, "loss": float(loss.detach()),
            "is_loss_finite": bool(torch.isfinite(loss.detach())), "are_masked_losses_zero": all(losses[h] == 0.0 for h in masked),
            "are_weights_in_sync": bool(torch.equal(low, high)), "seconds_per_step": seconds,
            **({"sync_batchnorm_layers": converted} if sync_bn else {})}


def _rank_main(rank: int, world_size: int, backend: str, device_type: str, run_dir: str, spec: dict) -> None:
    """One rank of a DDP part (started by torch.multiprocessing); rank 0 writes `result.json`."""
    import torch.distributed as dist

    from bcc.atomic import write_json

    if device_type == "cpu":
        torch.set_num_threads(1)  # the ranks share the machine's cores
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)  # every rank on the one GPU (gloo allows that, NCCL needs 1 rank)
    dist.init_process_group(backend, init_method=f"file://{run_dir}/rendezvous", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    try:
        out: dict[str, Any] = {}
        for name, sync_bn in (("ddp", False), ("sync_bn", True)):
            if name == "sync_bn" and not spec["sync_bn"]:
                continue
            try:
                out[name] = _ddp_step(spec, device, rank, sync_bn)
            except Exception as e:  # noqa: BLE001 -- a failure on one rank leaves the others waiting: the
                # process-group timeout, then the parent's, ends them
                out[name] = {**_error(e), "traceback": traceback.format_exc(limit=-3)}
        if rank == 0:
            write_json(Path(run_dir) / "result.json", out)
    finally:
        dist.destroy_process_group()


def run_ranks(plan: GpuPlan, world_size: int, backend: str, device: torch.device, tmp: Path,
              sync_bn: bool = False) -> dict:
    """Run `_rank_main` in `world_size` processes and return rank 0's result; ranks that have not ended
    `rank_timeout_s + rank_startup_s` seconds after the start are killed and the part is an error."""
    import torch.multiprocessing as mp

    run_dir = Path(tempfile.mkdtemp(prefix=f"{backend}{world_size}-", dir=tmp))
    spec = {"plan": dataclasses.asdict(plan), "timeout_s": plan.rank_timeout_s, "sync_bn": sync_bn}
    # CUDA cannot be used in a forked child of a process that has used it; fork is much faster on the CPU
    method = "spawn" if device.type == "cuda" else "fork"
    context = mp.start_processes(_rank_main, args=(world_size, backend, device.type, str(run_dir), spec),
                                 nprocs=world_size, join=False, start_method=method)
    limit = plan.rank_timeout_s + plan.rank_startup_s
    t0 = time.monotonic()
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() - t0 > limit:
                return {"error": f"{world_size}-rank {backend} step: no result after {limit:.0f} s (a rank hung); "
                                 "ranks killed"}
    except mp.ProcessRaisedException as e:
        return {"error": f"{world_size}-rank {backend} step: a rank raised: {str(e).strip().splitlines()[-1]}"}
    except mp.ProcessExitedException as e:
        return {"error": f"{world_size}-rank {backend} step: {e}"}
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join()
    result = run_dir / "result.json"
    if not result.is_file():
        return {"error": f"{world_size}-rank {backend} step: rank 0 wrote no result"}
    out = json.loads(result.read_text())
    out["ddp"]["wall_s"] = time.monotonic() - t0
    return out
