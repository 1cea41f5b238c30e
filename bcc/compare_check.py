"""Checks of a comparison's runs against each other: before `bcc compare` trains anything (every planned run
can train to the end, and a run dir that already holds a run holds one of this command's config) and before
the tables are built (every run of the comparison trained under one config but for what the arms vary).

A comparison's runs may differ only in what makes them arms and seeds (`finetune.preset`, `model.pretrained`,
`train.seed`, `data.shards` with --packs, the run dir) and in how they executed: the keys a resumed run may
change (`bcc.train.resume.SAFE_RESUME_KEYS`), less those that change what the table reads (`COMPARED_KEYS`:
the epoch budget first).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from bcc.compare import RESUME, CompareError, PlannedRun, _replace
from bcc.config import Config, config_diff, load_config, load_saved_config
from bcc.errors import BccError

# keys resume lets change (bcc.train.resume.SAFE_RESUME_KEYS) that still change what a comparison reads from a
# run: its budget, the checkpoint it calls best, the epochs with val and test rows
COMPARED_KEYS = ("train.epochs", "checkpoint.metric", "checkpoint.mode", "eval.every_epochs", "eval.test_at_end",
                 # fitted at the end of training and read by the table (test_binary_op_*, calibrated columns)
                 "eval.operating_point", "eval.calibrate")


def is_free_key(key: str) -> bool:
    """Whether two runs of one comparison arm may differ in `key`: how a run executes (processes, workers,
    logging, compile, checkpoint cadence), not what it computes or what the table reads."""
    from bcc.train.resume import is_safe_resume_key

    return key not in COMPARED_KEYS and is_safe_resume_key(key)


def run_differences(old: Config, new: Config, also_free: Sequence[str] = ()) -> list[str]:
    """`key: old -> new` for every key two runs may not differ in (`is_free_key`, and `also_free`)."""
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in config_diff(old, new).items()
            if not is_free_key(k) and k not in also_free]


class RunPlan(Protocol):
    """What `check_runs` reads of a planned run: a `bcc.compare.PlannedRun`, or a `bcc cv` fold."""

    run_dir: Path
    overrides: tuple[str, ...]  # applied after the user's overrides


def check_runs(config: str | Path | None, overrides: Sequence[str], runs: Sequence[RunPlan | PlannedRun],
               command: str = "compare") -> None:
    """Refuse a comparison (or `bcc cv`, `command` "bcc cv") before anything trains when a planned run could
    not train to the end (its config, its fine-tuning plan for its preset and train.epochs, or its
    `eval.operating_point` on its val split fails) or when its run dir already holds a run of another
    config (which `command` would skip or resume, mixing budgets). CompareError naming the run dir (and
    the differing keys)."""
    from bcc.finetune import resolve_stages
    from bcc.model import build_model, parameter_groups
    from bcc.operating_point import check_val_fittable, parse_operating_point
    from bcc.pretrained import SourcePreprocess, explicit_keys, follow_source
    from bcc.sources import load_data
    from bcc.taxonomy import Taxonomy

    groups: dict[object, list[str]] = {}  # group names per model config: one build each
    fittable: set[object] = set()  # data configs whose val split can fit eval.operating_point
    hashes: dict[str, str | None] = {}  # pretrained source -> its current sha256 (read once per source)
    for run in runs:
        given = [*overrides, *run.overrides, RESUME]
        try:
            cfg = load_config(config, given)
            if not parse_operating_point(cfg.eval.operating_point).is_argmax and (cfg.data, cfg.eval) not in fittable:
                check_val_fittable(cfg, load_data(cfg.data))  # e.g. a --packs pack or a fold without benign cells
                fittable.add((cfg.data, cfg.eval))
            # neither the weights nor the head sizes change the group names: read no weights, no manifest
            model = _replace(cfg.model, pretrained="")
            if model not in groups:
                groups[model] = list(parameter_groups(build_model(model, dict(Taxonomy.default().head_sizes))))
            resolve_stages(cfg.finetune, cfg.train.epochs, groups[model], cfg.train.warmup_steps)
        except BccError as e:
            raise CompareError(f"{run.run_dir}: {e} (nothing trained)") from None
        held = [n for n in ("config.yaml", "summary.json", "checkpoints") if (run.run_dir / n).exists()]
        if not held:
            continue
        fix = "use another --out, or delete the run to train it again"
        if not (run.run_dir / "config.yaml").is_file():
            raise CompareError(f"{run.run_dir} holds {', '.join(held)} but no config.yaml, so which config it "
                               f"trained is unknown; {fix}")
        saved = load_saved_config(run.run_dir / "config.yaml")
        if cfg.model.pretrained:  # the data follow the run's source as a resumed run's do (bcc.train.resume)
            d = saved.data
            pre = SourcePreprocess(mean=d.mean, std=d.std, image_size=d.image_size, crop_pct=d.crop_pct)
            cfg = _replace(cfg, data=follow_source(cfg.data, pre, explicit_keys(config, given))[0])
        diff = run_differences(saved, cfg)
        verb = "reuse" if "summary.json" in held else "resume"
        if diff:
            raise CompareError(f"{run.run_dir} holds a run of another config than this command's ({'; '.join(diff)}): "
                               f"{command} would {verb} it beside runs of this config; {fix}")
        if cfg.model.pretrained:
            check_source_hash(run.run_dir, cfg.model.pretrained, cfg.model.backbone, f"{command} would {verb} it",
                              hashes)


def check_source_hash(run_dir: Path, source: str, backbone: str, what: str, hashes: dict[str, str | None]) -> None:
    """Refuse a run that started from other weights than `source` holds now (same path, retrained or
    replaced weights): its `pretrained.json` sha256 against the source's current one (`hashes` caches
    them per source). A source that cannot be read now, the hub, or a run without the record: no check."""
    import json

    from bcc.pretrained import source_sha256
    from bcc.train.fit import PRETRAINED_FILE

    try:
        recorded = json.loads((run_dir / PRETRAINED_FILE).read_text(encoding="utf-8"))["sha256"]
        if source not in hashes:
            hashes[source] = source_sha256(source, backbone)
    except (OSError, ValueError, KeyError, TypeError, BccError):
        return
    current = hashes[source]
    if current is not None and recorded and recorded != current:
        raise CompareError(f"{run_dir} was trained from pretrained source {source} with sha256 {recorded[:12]}, "
                           f"which now holds sha256 {current[:12]} (retrained or replaced): {what} beside runs from "
                           "the new weights; delete the run dir to train it again from them, or use another --out "
                           "(or put the old weights back)")


ARM_KEYS = ("finetune.preset", "model.pretrained", "train.seed", "data.shards")  # what makes arms, seeds, packs
FOLLOWED_KEYS = ("data.mean", "data.std", "data.image_size", "data.crop_pct")  # follow model.pretrained's source


def check_same_config(run_dirs: Sequence[Path]) -> None:
    """Refuse to tabulate runs trained under different configs (another epoch budget, rate, batch...): a
    table over them would choose and compare across budgets. They may differ in ARM_KEYS, in how they
    executed (`is_free_key`), and in FOLLOWED_KEYS between a pretrained and a scratch run. CompareError."""
    if not run_dirs:
        return
    first = Path(run_dirs[0])
    ref = load_saved_config(first / "config.yaml")
    for d in run_dirs[1:]:
        cfg = load_saved_config(Path(d) / "config.yaml")
        free = ARM_KEYS + (FOLLOWED_KEYS if cfg.model.pretrained != ref.model.pretrained else ())
        diff = run_differences(ref, cfg, free)
        if diff:
            raise CompareError(f"{d} was trained under another config than {first} ({'; '.join(diff)}): a table "
                               "over both would compare different budgets or recipes; aggregate only the runs of "
                               f"one config (move the others to another directory) or retrain {d}")


def pretrained_text(run_dirs: Sequence[Path], root: Path) -> str:
    """One Markdown line naming the pretrained source(s) the runs started from, with the short sha256 of
    each run's `pretrained.json` (RESULTS.md, CV.md); "" when no run started from one. Runs whose
    recorded weights differ are listed each (relative to `root`), so a mix is never averaged unseen.
    A warning paragraph follows when a run's source trained on images it evaluates (its `overlap`,
    `bcc.pretrained_overlap.overlap_warning`)."""
    import json

    from bcc.pretrained_overlap import overlap_warning
    from bcc.train.fit import PRETRAINED_FILE

    found: dict[tuple[str, str], list[str]] = {}
    overlap: dict[str, list] = {}  # run -> the images it evaluates that its source trained on (`overlap`)
    for d in run_dirs:
        name = str(d.relative_to(root)) if d.is_relative_to(root) else str(d)
        try:
            record = json.loads((d / PRETRAINED_FILE).read_text(encoding="utf-8"))
            key = (str(record["source"]), str(record["sha256"])[:12])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        found.setdefault(key, []).append(name)
        if isinstance(record.get("overlap"), list):
            overlap[name] = record["overlap"]
    if not found:
        return ""
    warning = overlap_warning(overlap)
    if len(found) == 1:
        (source, sha), = found
        text = f"Pretrained source: `{source}` (sha256 {sha}) for every run that starts from one."
    else:
        per = "; ".join(f"`{source}` (sha256 {sha}): {', '.join(runs)}" for (source, sha), runs in found.items())
        text = f"**Pretrained sources differ between runs**: {per}."
    return text + (f"\n\n{warning}" if warning else "")


def check_packs(packs: Sequence[str]) -> None:
    """`--packs` are one data set split once per seed: refuse a pack whose taxonomy, or whose images per
    class over all its splits (the same images however they are split: by each pack's
    `sample_index.npz`, the source files' sha256 per class as a multiset; by the manifests' class totals
    alone, with a note, for a pack without one), differ from the first pack's, naming both packs; a note
    when they were packed at another `--resize` (a CompareError otherwise)."""
    from collections import Counter

    from bcc.console import note
    from bcc.manifest import Manifest
    from bcc.predict import _label_structure, describe_taxonomy

    loaded = []
    for pack in packs:
        try:
            m = Manifest.load(pack, key="--packs")
        except BccError as e:
            raise CompareError(str(e) if str(e).startswith("--packs") else f"--packs: {e}") from None
        totals: Counter = Counter()
        for name in m.splits:
            totals.update(m.split(name).class_counts)
        loaded.append((pack, m, {c: n for c, n in sorted(totals.items()) if n}))
    first, ref, ref_totals = loaded[0]
    read: dict = {}  # pack -> its images (the first pack's read once)
    why = "the packs of one comparison are the same data set split by seed (bcc pack --seed S)"
    for pack, m, totals in loaded[1:]:
        if _label_structure(m.taxonomy) != _label_structure(ref.taxonomy):
            raise CompareError(f"--packs: {pack} has taxonomy {describe_taxonomy(m.taxonomy)}, {first} has "
                               f"{describe_taxonomy(ref.taxonomy)}; {why}")
        if totals != ref_totals:
            raise CompareError(f"--packs: {pack} holds other images than {first} (per class over all splits: "
                               f"{totals} vs {ref_totals}); {why}")
        _same_images(first, ref, pack, m, why, read)
        if m.options.get("resize") != ref.options.get("resize"):
            note(f"--packs: {pack} was packed with --resize {m.options.get('resize')}, "
                 f"{first} with {ref.options.get('resize')}")  # stderr: a --plan's stdout is its plan


def _same_images(first: str, ref, pack: str, m, why: str, read: dict) -> None:
    """Refuse (CompareError) when packs `first` and `pack` (their manifests `ref`, `m`) hold other
    images: the multisets of (class, source-file sha256 prefix) over all splits differ. Where either
    pack has no usable index a note says the class totals alone were compared. `read` caches each
    pack's images."""
    import numpy as np

    from bcc.console import note
    from bcc.sample_index import SampleIndexError, pack_images

    images = {}
    for name, manifest in ((first, ref), (pack, m)):
        try:
            images[name] = read[name] if name in read else read.setdefault(name, pack_images(manifest))
        except SampleIndexError as e:
            raise CompareError(f"--packs: {name}: {e}") from None
        if isinstance(images[name], str):
            other = pack if name == first else first
            note(f"--packs: {name}: {images[name]}; compared with {other} by images per class only")
            return
    only_here, only_there = 0, 0
    ours, theirs = images[pack], images[first]
    for cls in set(ours) | set(theirs):
        a, b = ours.get(cls, np.zeros(0, np.uint64)), theirs.get(cls, np.zeros(0, np.uint64))
        ua, ca = np.unique(a, return_counts=True)
        ub, cb = np.unique(b, return_counts=True)
        _, ia, ib = np.intersect1d(ua, ub, assume_unique=True, return_indices=True)
        matched = int(np.minimum(ca[ia], cb[ib]).sum())
        only_here, only_there = only_here + len(a) - matched, only_there + len(b) - matched
    if only_here or only_there:
        total = sum(len(v) for v in ours.values())
        raise CompareError(f"--packs: {pack} holds other images than {first}: {only_here} of its {total} images "
                           f"(source file and class) are not in {first}, {only_there} of {first}'s are not in it; {why}")

