"""The model card (`README.md`) of a Hub export (`bcc export --format hf`).

`card_facts(im, weights)` collects what the run recorded about the exported checkpoint, reading only
what training and `bcc eval` already wrote:

* the training data: split sizes and class counts from the packed dataset's `manifest.json`
  (`data.shards` of the run's config, or its `data.sources` together), named by directory or source
  name only;
* test metrics: `RUN/eval-<test split>/metrics.json` when `bcc eval` made it from this checkpoint
  (combined and per head, and per class from its confusion matrix), else the test row training
  logged in `RUN/metrics.jsonl` (`eval.test_at_end`), with the test split's size;
* calibration: `temperature.json` and `operating_point.json` of the checkpoint (split and size they
  were fitted on, the validation sensitivity/specificity at argmax and at the point); for an EMA
  export their `ema` entries (the EMA weights' own fit) and the `ema_*` test columns;
* the run: its name, the checkpoint's step and epoch, the tracked metric.

`render_card(config, facts, license)` writes the card: YAML front matter the Hub reads
(`library_name`, `license`, `tags`, `pipeline_tag`), intended and not-intended use, a not-for-clinical-use
statement, how to load it, data, metrics, calibration, limitations, the pretrained source and the
key layout. No absolute path of the trainer's machine goes into the card.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["card_facts", "per_class_results", "render_card"]

SHOWN = ("count", "acc", "bacc", "f1", "auroc", "ece", "ece_raw", "sens", "spec", "op_sens", "op_spec", "op_bacc", "loss")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def per_class_results(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """Per leaf class: support (true count), recall and precision (None where undefined), from a
    confusion matrix with true classes as rows and decided classes as columns."""
    out = []
    for i, name in enumerate(classes):
        support = int(sum(confusion[i]))
        decided = int(sum(row[i] for row in confusion))
        hit = int(confusion[i][i])
        out.append({"class": name, "support": support, "recall": hit / support if support else None,
                    "precision": hit / decided if decided else None})
    return out


def _dataset_name(root) -> str:
    """A dataset's last path part: a local folder's name, or of a URL / `pipe:` template's location (its
    `{name}` slot and any host or credential left out)."""
    from pathlib import Path

    from bcc import remote

    if isinstance(root, Path):
        return root.name
    text = remote.display(root).replace("{name}", "").split("?")[0]
    parts = [p for p in text.replace(" ", "/").split("/") if p and p not in ("-",)]
    return parts[-1] if parts else text


def _data_facts(im) -> dict[str, Any] | None:
    from bcc.errors import BccError
    from bcc.sources import MixedManifest, load_data

    d = im.config.data
    try:
        manifest = load_data(d)  # data.shards (its data.fold view) or the sources of data.sources
    except BccError:
        return None
    splits = {name: {"count": manifest.split(name).count, "class_counts": manifest.split(name).class_counts}
              for name in manifest.splits}
    name = (", ".join(s.name for s in manifest.sources) if isinstance(manifest, MixedManifest)
            else _dataset_name(manifest.root))
    return {"name": name, "splits": splits, "train": d.train_split, "val": d.val_split,
            "test": d.test_split, "fold": d.fold, "classes": list(manifest.classes)}


def _test_facts(im, weights: str) -> dict[str, Any] | None:
    run, split = im.run_dir, im.config.data.test_split
    if run is None:
        return None
    evaluation = _read_json(run / f"eval-{split}" / "metrics.json")
    if (weights != "ema" and isinstance(evaluation, dict) and evaluation.get("checkpoint") == str(im.checkpoint)
            and evaluation.get("kind") == "packed" and evaluation.get("split") == split):
        combined = evaluation.get("combined", {})
        return {
            "source": f"`bcc eval` of this checkpoint on the {split} split",
            "split": split, "count": evaluation.get("count"), "weights": "raw",
            "combined": {k: combined[k] for k in SHOWN if k in combined},
            "heads": {h: {k: v[k] for k in SHOWN if k in v} for h, v in evaluation.get("heads", {}).items()},
            "per_class": per_class_results(combined["confusion"], evaluation["classes"])
            if "confusion" in combined else [],
            "calibrated": bool(evaluation.get("calibrated")),
            "operating_point": evaluation.get("operating_point"),
        }
    # the final test of training: the last row of the test split in metrics.jsonl
    from bcc.train.runlog import RunLogError, read_rows

    try:
        rows = [row for row in read_rows(run / "metrics.jsonl") if row.get("split") == split]
    except RunLogError:
        return None
    if not rows:
        return None
    row = rows[-1]
    prefix = "ema_" if weights == "ema" and any(k.startswith("ema_") for k in row) else ""
    flat = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)} if prefix else row
    heads = {h: {k: flat[f"{h}_{k}"] for k in SHOWN if f"{h}_{k}" in flat} for h in im.taxonomy.head_names}
    return {
        "source": f"the final test of training ({row.get('checkpoint', 'best')} checkpoint, metrics.jsonl)",
        "split": split, "count": flat.get("count"), "weights": "ema" if prefix else "raw",
        "combined": {k: flat[k] for k in SHOWN if k in flat}, "heads": heads,
        "per_class": per_class_results(flat["confusion"], im.taxonomy.class_names) if "confusion" in flat else [],
        "calibrated": None, "operating_point": None,
    }


def card_facts(im, weights: str) -> dict[str, Any]:
    """What the card says about the run behind `im` (an `InferenceModel`); see the module docstring."""
    from bcc.calibration import TEMPERATURE_FILE, temperature_fit
    from bcc.checkpoint import read_train_state
    from bcc.errors import BccError
    from bcc.operating_point import point_fit, stored_points

    state = read_train_state(im.checkpoint)
    key = "ema" if weights == "ema" else "raw"  # the EMA weights' own fits (`bcc.export.ema_calibration`)
    temps = _read_json(im.checkpoint / TEMPERATURE_FILE)
    temps = (temps.get("ema") if key == "ema" else temps) if isinstance(temps, dict) else None
    try:
        point = (stored_points(im.checkpoint) or {}).get(key)
    except BccError:  # the card says what it can; the model loaded with what it could read
        point = None
    # where each was fitted (split, fold, count, step): the one reading of both files' fit facts
    temps = {**temps, **(temperature_fit(im.checkpoint, key) or {})} if isinstance(temps, dict) else None
    point = {**point, **(point_fit(im.checkpoint, key) or {})} if isinstance(point, dict) else None
    return {
        "run": im.run_dir.name if im.run_dir is not None else None,
        "step": im.step,
        "epoch": getattr(state, "epoch", None),
        "metric": im.config.checkpoint.metric if hasattr(im.config, "checkpoint") else None,
        "best_metric": getattr(state, "best_metric", None),
        "weights": weights,
        "data": _data_facts(im),
        "test": _test_facts(im, weights),
        "temperature_fit": {k: temps.get(k) for k in ("split", "fold", "count", "step", "ece_before", "ece_after")}
        if temps else None,
        "operating_point_fit": point,
    }


# --------------------------------------------------------------------------- rendering


def _fitted_on(fit: dict) -> str:
    """Where a fit was made, in the words eval and the report use (`bcc.evaluate.shown_split`)."""
    from bcc.evaluate import shown_split

    return f"the `{shown_split(fit['split'], fit.get('fold'))}` split"


def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _front_matter(config: Mapping[str, Any], license: str) -> str:  # noqa: A002
    tags = ["bcc", "image-classification", "medical-imaging", "pytorch", "safetensors",
            config["backbone_library"], config["backbone"], config["taxonomy"]["name"]]
    meta = {"library_name": "bcc", "license": license, "pipeline_tag": "image-classification",
            "tags": list(dict.fromkeys(tags))}
    if license == "other":
        meta["license_name"] = "unspecified"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def render_card(config: Mapping[str, Any], facts: Mapping[str, Any], license: str = "other") -> str:  # noqa: A002
    """The card's Markdown (with its YAML front matter) for a Hub export's `config` and the run's `facts`."""
    tax = config["taxonomy"]
    classes = [c["name"] for c in tax["classes"]]
    heads = config["heads"]
    p = config["preprocess"]
    weights = ("the exponential moving average (EMA) of the weights" if config["weights"] == "ema"
               else "the raw trained weights (no EMA)")
    head_text = "; ".join(f"`{h['name']}` ({', '.join(h['labels'])})" for h in heads)
    out = [_front_matter(config, license)]
    out.append(f"# {facts.get('run') or 'bcc model'}: {tax['name']} classifier ({config['backbone']})\n")
    out.append("> **Not for clinical use.** This is a research model. It has not been validated for diagnosis, "
               "screening or treatment decisions and must not be used for them.\n")
    out.append(
        f"A multitask image classifier trained with bcc (distributed trainer for medical image classification) on the `{tax['name']}` taxonomy: "
        f"a shared `{config['backbone']}` backbone ({config['backbone_library']}) with one head per question: "
        f"{head_text}. Leaf classes: {', '.join(classes)}. The hierarchical answer takes the root head first "
        f"and names the next head's label only where that head applies. This export holds {weights}, from "
        f"training step {facts.get('step')}"
        + (f", after {facts['epoch']} epoch(s)" if facts.get("epoch") is not None else "") + ".\n")

    out.append("## Intended use\n")
    out.append("- Research on automated classification of microscopy images of the kind it was trained on "
               f"({', '.join(classes)}), e.g. benchmarking, method development and teaching.\n"
               "- A starting point for fine-tuning on similar data (`model.pretrained=` of a bcc run; the "
               "backbone also loads into its own library, see *Key layout*).\n")
    out.append("## Not intended use\n")
    out.append("- Any clinical use: diagnosis, screening, triage or treatment decisions for patients.\n"
               "- Images from other stains, scanners, magnifications, cell types or preparation protocols than "
               "the training data without a new validation.\n"
               "- A decision without a qualified person reviewing the image: probabilities are not diagnoses.\n")

    out.append("## How to use\n")
    out.append("```bash\n# with bcc installed\nbcc predict --checkpoint hf-hub:OWNER/NAME cell.jpg   # or a local copy of "
               "this folder\n```\n")
    out.append("In Python, `bcc.export.load_export_model(\"hf-hub:OWNER/NAME\")` gives the model, its taxonomy, "
               "preprocessing, temperatures and operating point (`bcc.predict.predict_paths` uses them).\n")

    out.append("## Preprocessing\n")
    out.append(f"RGB; resize the short side to int({p['image_size']} / {p['crop_pct']}) (bilinear, antialias); "
               f"centre crop {p['image_size']}x{p['image_size']}; scale to [0, 1]; normalise with mean "
               f"{list(p['mean'])} and std {list(p['std'])}.\n")

    out.append("## Training data\n")
    data = facts.get("data")
    if data:
        names = [s for s in (data["train"], data["val"], data["test"]) if s in data["splits"]]
        names += [s for s in data["splits"] if s not in names]
        rows = [[s, data["splits"][s]["count"], *(data["splits"][s]["class_counts"].get(c, 0) for c in classes)]
                for s in names]
        role = {data["train"]: "train", data["val"]: "validation (model selection, calibration)",
                data["test"]: "test (held out)"}
        out.append(f"Packed dataset `{data['name']}`; splits used: "
                   + ", ".join(f"`{s}` {role[s]}" for s in (data["train"], data["val"], data["test"])
                               if s in data["splits"])
                   + (f"; cross-validation fold {data['fold']}" if data.get("fold") is not None else "") + ".\n")
        out.append(_table(["split", "images", *classes], rows) + "\n")
    else:
        out.append("The run's packed dataset (its manifest.json) was not available when this export was made, "
                   "so its split sizes are not listed here.\n")

    out.append("## Evaluation\n")
    test = facts.get("test")
    if test:
        out.append(f"Test split `{test['split']}`: **{test['count']} images**; source: {test['source']}"
                   + (", with temperature-scaled probabilities" if test.get("calibrated") else "")
                   + (f", decisions at the operating point ({test['operating_point'].get('rule')})"
                      if test.get("operating_point") else "") + ".\n")
        if test.get("weights") != config["weights"]:
            out.append(f"These metrics were measured with the {test.get('weights')} weights; this export holds "
                       f"the {config['weights']} weights.\n")
        keys = [k for k in SHOWN if k in test["combined"] or any(k in h for h in test["heads"].values())]
        rows = [["combined (leaf classes)", *(test["combined"].get(k) for k in keys)]]
        rows += [[f"head `{h}`", *(v.get(k) for k in keys)] for h, v in test["heads"].items()]
        out.append(_table(["scope", *keys], rows) + "\n")
        op = any(k.startswith("op_") for k in keys)
        out.append("`sens`/`spec`: sensitivity and specificity of a two-class head's second label (e.g. Malignant) "
                   "at argmax" + (", `op_*` at the operating point" if op else "") + ". "
                   "`ece`: expected calibration error (15 bins).\n")
        if test["per_class"]:
            out.append("Per class (hierarchical decision):\n")
            out.append(_table(["class", "support", "recall", "precision"],
                              [[r["class"], r["support"], r["recall"], r["precision"]] for r in test["per_class"]])
                       + "\n")
    else:
        out.append("No test-split evaluation was recorded for this checkpoint (run `bcc eval --checkpoint RUN "
                   "--split test` before exporting to have it here).\n")

    out.append("## Calibration and decision\n")
    temps = config.get("temperatures")
    fit = facts.get("temperature_fit") or {}
    if temps:
        out.append("Temperature scaling (divide each head's logits by T before the softmax): "
                   + ", ".join(f"`{h}` T={t:.4f}" for h, t in temps.items())
                   + (f"; fitted on {_fitted_on(fit)} ({fit.get('count')} images)" if fit.get("split") else "")
                   + ".\n")
        before, after = fit.get("ece_before") or {}, fit.get("ece_after") or {}
        if "combined" in before and "combined" in after:
            out.append(f"ECE on that split, combined: {before['combined']:.4f} raw, {after['combined']:.4f} "
                       "temperature-scaled.\n")
    else:
        out.append("No temperatures: the probabilities are the raw softmax, which is usually over-confident.\n")
    point = config.get("operating_point")
    if point:
        val = (facts.get("operating_point_fit") or {}).get("val") or point.get("val") or {}
        rates = ""
        if val.get("argmax") and val.get("chosen"):
            rates = (f" Validation sensitivity/specificity: {val['argmax']['sens']:.3f}/{val['argmax']['spec']:.3f} "
                     f"at argmax, {val['chosen']['sens']:.3f}/{val['chosen']['spec']:.3f} at this point.")
        where = facts.get("operating_point_fit") or {}
        out.append(f"Operating point `{point.get('rule')}`: head `{point['head']}` says "
                   f"`{point.get('positive_label')}` when its probability is >= {point['threshold']:.4f} "
                   f"(logit margin {point['margin']:.4f}, the same decision with or without the temperatures)"
                   + (f"; fitted on {_fitted_on(where)}" if where.get("split") else "") + f".{rates}\n")
    else:
        out.append("No operating point: every head decides by argmax.\n")

    out.append("## Limitations\n")
    out.append("- Trained and tested on one dataset: performance on other sites, stains, scanners or populations "
               "is unknown and is likely lower.\n"
               "- The test split comes from the same source as the training data; near-duplicate images are kept "
               "on one side of a split when the pack found them, but patients may still appear in several splits "
               "unless the data was split by patient.\n"
               "- Small test sets give wide confidence intervals; per-class results with a small support are "
               "especially uncertain.\n"
               "- Grad-CAM overlays (`bcc predict --gradcam`) show where the model looked, not why it is right.\n")

    out.append("## Pretrained source\n")
    pre = config.get("pretrained")
    if pre:
        out.append(f"The backbone started from `{pre.get('source')}` ({pre.get('kind')}), sha256 "
                   f"`{pre.get('sha256')}`.\n")
    else:
        out.append("No pretrained source was recorded for this run (trained from a random initialisation, or by "
                   "a bcc version that did not record it).\n")

    out.append("## Key layout of model.safetensors\n")
    layout = config["key_layout"]
    out.append(f"- Backbone: {layout['backbone']}.\n- Heads: {layout['heads']}.\n")
    out.append(f"- `config.json` (`{config['format']}` version {config['format_version']}) holds the "
               "architecture, taxonomy, preprocessing, temperatures and operating point.\n")
    return "\n".join(out)
