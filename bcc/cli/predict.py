"""`bcc predict`: the hierarchical answer for images (files or directories, searched recursively).

Prints per image the decision (`Benign`, or `Malignant: Pro-B`: the subtype only when the binary head
says malignant) and the probabilities of every head. `--tta` averages the softmax over the identity and
the horizontal, vertical and both flips. `--gradcam DIR` writes `DIR/<image stem>.<head>.png` per head:
the original image (its own size) with the Grad-CAM map of that head's predicted class laid over the
region the model saw. DIR may not be an input folder nor lie inside one (the overlays would be read as
images next time), and an overlay that would replace an input file is named `<stem>-2.<head>.png`.
Exit code 1 when some file could not be read (the others are still predicted); 2 when nothing could be
predicted (every input missing or unreadable, or no images given)."""

from __future__ import annotations

import argparse

from bcc.cli import add_weights_option


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict images with a checkpoint", description=__doc__)
    p.add_argument("--checkpoint", "-c", required=True, metavar="RUN|CKPT|EXPORT",
                   help="run dir (its best checkpoint), checkpoints dir, step dir, best/last link, a `bcc export` "
                        "folder or hf-hub:OWNER/NAME (optionally @REVISION)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories")
    p.add_argument("--csv", default=None, metavar="FILE", help="write one row per image (failures included)")
    p.add_argument("--json", default=None, metavar="FILE", help="write predictions and failures as JSON")
    p.add_argument("--gradcam", default=None, metavar="DIR", help="write Grad-CAM overlays per image and head")
    p.add_argument("--tta", action="store_true", help="average over flips (4 forward passes per image)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-calibration", action="store_true", help="ignore stored temperatures")
    p.add_argument("--argmax", action="store_true",
                   help="ignore a stored operating point (the binary decision at probability 0.5)")
    add_weights_option(p)
    p.set_defaults(func=run)


def _line(pred) -> str:
    heads = "  ".join(
        f"{head}: " + " ".join(f"{label} {p:.3f}" for label, p in probs.items())
        for head, probs in pred.head_probs.items()
    )
    return f"{pred.path}: {pred.answer}  |  {heads}"


def run(args: argparse.Namespace) -> int:
    from bcc.console import console, error
    from bcc.errors import UsageError

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    from bcc.predict import load_inference_model, predict_paths, write_predictions_csv, write_predictions_json

    im = load_inference_model(args.checkpoint, calibrated=not args.no_calibration, operating_point=not args.argmax,
                              weights=args.weights)
    result = predict_paths(im, args.paths, tta=args.tta, batch_size=args.batch_size,
                           gradcam_dir=args.gradcam,
                           on_prediction=lambda p: console.print(_line(p), markup=False, soft_wrap=True))
    for path, reason in result.failures:
        error(f"{path}: {reason}")
    if args.csv:
        write_predictions_csv(result, im.taxonomy, args.csv)
    if args.json:
        write_predictions_json(result, args.json)
    n, bad = len(result.predictions), len(result.failures)
    notes = [f"{im.weights} weights", ("temperature-scaled" if result.calibrated else "uncalibrated"), *(["TTA x4"] if args.tta else []),
             *([f"{im.operating_point['head']} positive at p >= {result.threshold:.4f}"]
               if result.threshold is not None else [])]
    if args.gradcam:
        notes.append(f"Grad-CAM in {args.gradcam}")
    console.print(f"{n} image(s) predicted, {bad} failed ({', '.join(notes)})", soft_wrap=True)
    if n == 0:  # nothing to show for the run: a usage error, like any other bad input
        if bad == 0:
            raise UsageError("no images given")
        return 2  # each failed file had its own `error:` line above
    return 1 if bad else 0
