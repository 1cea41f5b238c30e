"""`bcc export`: a checkpoint as `model.safetensors` + `bcc_export.json` (model config, taxonomy,
preprocessing, temperatures), loadable without the training stack by `bcc.export.load_exported(DIR)`;
optionally TorchScript (when tracing works) and ONNX (when the onnx package is installed)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint for inference", description=__doc__)
    p.add_argument("--checkpoint", "-c", required=True, metavar="RUN|CKPT",
                   help="run dir (its best checkpoint), checkpoints dir, step dir or best/last link")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    p.add_argument("--torchscript", action="store_true", help="also write model.torchscript.pt (torch.jit.trace)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx package)")
    p.add_argument("--no-calibration", action="store_true", help="leave stored temperatures out of the export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bcc.console import console, warn
    from bcc.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, torchscript=args.torchscript, onnx=args.onnx,
                               calibrated=not args.no_calibration)
    for note in result.notes:
        warn(note)
    for f in result.files:
        console.print(f"wrote {f}", soft_wrap=True)
    console.print(f"load with: from bcc.export import load_exported; model, taxonomy, preprocess = "
                  f"load_exported({str(result.directory)!r})", soft_wrap=True, markup=False)
    return 0
