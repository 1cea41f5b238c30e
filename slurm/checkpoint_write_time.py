"""How long bcc takes to write one full checkpoint of a model: the figure the USR1 lead time is sized on.

    python slurm/checkpoint_write_time.py [--backbone vgg16_bn] [--optimizer sgd|adamw] [--repeats 3] [--dir DIR]

Builds the multitask model on the CPU with the default taxonomy, gives the optimizer its full state
(one step on zero gradients creates SGD's momentum / AdamW's moments), and times
`CheckpointManager.save` (model.safetensors + optimizer.pt + rng + state, fsynced, renamed) into DIR,
which should be on the filesystem the run directory will use (default: a temporary directory there).
Prints one line per save and the slowest. See docs/cluster.md for the rule that turns it into
`--signal=B:USR1@N`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def measure(backbone: str, optimizer: str, repeats: int, where: Path) -> list[float]:
    import torch

    from bcc.checkpoint import Checkpoint, CheckpointManager, TrainState, save_rng_state
    from bcc.config import ModelConfig
    from bcc.model import build_model
    from bcc.taxonomy import Taxonomy

    model = build_model(ModelConfig(backbone=backbone), Taxonomy.default().head_sizes)
    params = [p for p in model.parameters()]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=0.001)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    n = sum(p.numel() for p in params)
    print(f"{backbone}: {n / 1e6:.1f}M parameters, optimizer {optimizer}")

    seconds = []
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        manager = CheckpointManager(
            Path(tmp) / "checkpoints", keep_last=1, keep_top_k=0, metric="loss", mode="min"
        )
        for step in range(1, repeats + 1):
            ckpt = Checkpoint(
                model=model.state_dict(),
                optimizer=opt.state_dict(),
                scaler=None,
                rng=[save_rng_state()],
                state=TrainState(step=step),
                meta={"backbone": backbone},
            )
            start = time.perf_counter()
            path = manager.save(ckpt)
            seconds.append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in path.iterdir())
            print(
                f"save {step}: {seconds[-1]:.2f} s, {size / 2**20:.0f} MiB ({size / 2**20 / seconds[-1]:.0f} MiB/s)"
            )
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="vgg16_bn")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to write (default: .)")
    args = parser.parse_args(argv)
    seconds = measure(args.backbone, args.optimizer, args.repeats, args.dir)
    print(f"slowest save: {max(seconds):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
