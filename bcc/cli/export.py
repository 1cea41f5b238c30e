"""`bcc export`: a checkpoint as a folder to load without the training stack or to share.

`--format bcc` (default): `model.safetensors` + `bcc_export.json` (model config, taxonomy, preprocessing,
temperatures), loadable by `bcc.export.load_exported(DIR)`; optionally TorchScript (when tracing works)
and ONNX (when the onnx package is installed). `--format hf`: a Hugging Face Hub folder,
`model.safetensors` (backbone keys as timm/torchvision name them, heads under `heads.`) + a versioned
`config.json` + a `README.md` model card; `--push-to-hub OWNER/NAME` uploads it (the token from HF_TOKEN
or `huggingface-cli login`). Without --checkpoint, `--push-to-hub` uploads the existing export in --out.
`bcc predict --checkpoint DIR` and `--checkpoint hf-hub:OWNER/NAME` (optionally `@REVISION`) load a Hub
export."""

from __future__ import annotations

import argparse

from bcc.cli import add_weights_option


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint for inference or the Hugging Face Hub",
                              description=__doc__)
    p.add_argument("--checkpoint", "-c", default=None, metavar="RUN|CKPT",
                   help="run dir (its best checkpoint), checkpoints dir, step dir or best/last link")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    p.add_argument("--format", default=None, choices=("bcc", "hf"),
                   help="bcc: bcc_export.json layout (default); hf: a Hugging Face Hub folder with a model card")
    add_weights_option(p)
    p.add_argument("--license", default=None, metavar="ID", help="Hub license id for the card (--format hf; default other)")
    p.add_argument("--push-to-hub", default=None, metavar="OWNER/NAME", help="create the Hub repo and upload the hf export")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--torchscript", action="store_true", help="also write model.torchscript.pt (torch.jit.trace)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx package)")
    p.add_argument("--no-calibration", action="store_true", help="leave stored temperatures out of the export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bcc.console import console, warn
    from bcc.export import ExportError, export_checkpoint
    from bcc.export_hf import check_repo_id, push_export

    if args.private and not args.push_to_hub:
        raise ExportError("--private only applies with --push-to-hub")
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)  # before minutes of export work
        if args.format != "hf" and (args.checkpoint is not None or args.format is not None):
            raise ExportError(f"--push-to-hub uploads a Hub export: add --format hf (not --format {args.format or 'bcc'})")
    if args.checkpoint is None:
        if not args.push_to_hub:
            raise ExportError("--checkpoint is required (only --push-to-hub may upload an existing export in --out)")
        url = push_export(args.out, args.push_to_hub, private=args.private)
        console.print(f"uploaded {args.out} to {url}", soft_wrap=True, markup=False)
        return 0
    fmt = args.format or "bcc"
    result = export_checkpoint(args.checkpoint, args.out, format=fmt, weights=args.weights,
                               license=args.license, torchscript=args.torchscript, onnx=args.onnx,
                               calibrated=not args.no_calibration)
    for note in result.notes:
        warn(note)
    for f in result.files:
        console.print(f"wrote {f}", soft_wrap=True)
    if fmt == "hf":
        console.print(f"load with: bcc predict --checkpoint {result.directory} IMAGE ...", soft_wrap=True, markup=False)
        if args.push_to_hub:
            url = push_export(result.directory, args.push_to_hub, private=args.private)
            console.print(f"uploaded to {url}", soft_wrap=True, markup=False)
        return 0
    console.print(f"load with: from bcc.export import load_exported; model, taxonomy, preprocess = "
                  f"load_exported({str(result.directory)!r})", soft_wrap=True, markup=False)
    return 0
