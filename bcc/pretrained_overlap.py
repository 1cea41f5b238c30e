"""Images the bcc run behind `model.pretrained` trained on that this run evaluates, found through both
sides' `sample_index.npz` (`bcc.sample_index`): a backbone pretrained on test images with their labels
flatters the test scores. `pretrained_overlap` finds them (the start-up prints `overlap_line` of each,
`bcc.train.fit` records them in RUN/pretrained.json), `overlap_warning` is the line RESULTS.md and CV.md
show.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bcc.errors import BccError
from bcc.manifest import Manifest
from bcc.sample_index import FILE, OPT_OUT, SampleIndex, SampleIndexError, load, picture_roots, view_ids

__all__ = ["check_pretrained", "overlap_line", "overlap_warning", "pretrained_overlap"]


def _source_meta(weights: Path) -> dict | None:
    """The meta a bcc checkpoint keeps beside `weights` (its config, its dataset's fingerprint), or None
    for weights of no bcc run."""
    from bcc import checkpoint as ck

    try:
        if (weights.parent / ck.META_FILE).is_file():
            return json.loads((weights.parent / ck.META_FILE).read_text())
        if weights.name == ck.BEST_WEIGHTS and (weights.parent / ck.BEST_META).is_file():
            return json.loads((weights.parent / ck.BEST_META).read_text()).get("meta")
    except (OSError, ValueError):
        return None
    return None


def _indexed(manifest: Manifest, retries: int, timeout_s: float) -> list[tuple[Manifest, SampleIndex | str]]:
    """Each pack of `manifest` (the sources of a `MixedManifest`, or itself) with its index, or why none."""
    packs = [s.manifest for s in manifest.sources] if hasattr(manifest, "sources") else [manifest]
    return [(m, load(m, retries, timeout_s)) for m in packs]


def _pretrained_meta(source) -> tuple[dict | None, str | None]:
    """(the source's data record in checkpoint-meta form, or None; a note when an export's cannot be
    followed). A bcc export records its training data (`bcc.export.read_training_data`); a Hub export
    publishes no local paths, so it has none."""
    from bcc.export import EXPORT_FILE, read_training_data

    if source.weights is None:  # the hub
        return None, None
    folder = source.weights.parent
    if (folder / EXPORT_FILE).is_file():
        meta = read_training_data(folder)
        return (meta, None) if meta else (None, "an export that records no training data (exported by an older "
                                                "bcc, and its source checkpoint is gone)")
    if source.kind == "hf-export":  # a file inside one resolves to it too
        return None, "a Hub export, which records no training data"
    return _source_meta(source.weights), None


MAX_LINEAGE = 4  # how far back a backbone's sources are followed (a run fine-tuned from a run fine-tuned ...)


def _trained(source, data_cfg, unchecked: str) -> tuple[dict | None, list[dict], dict | None]:
    """(the source's training images: {"sha": sha256 prefixes, "phash": pHashes}, or None; notes where a
    check could not be made; its checkpoint meta, or None)."""
    from bcc.config import config_from_dict
    from bcc.sources import load_data

    meta, why = _pretrained_meta(source)
    if why:
        return None, [{"note": f"{unchecked}: it is {why}"}], None
    if not meta or "config" not in meta:
        return None, [], None
    try:
        theirs = config_from_dict(meta["config"]).data
        their_data = load_data(theirs)
        packs = _indexed(their_data, data_cfg.retries, data_cfg.read_timeout_s)
    except BccError as e:
        return None, [{"note": f"{unchecked}: its data cannot be read ({e})"}], meta
    if meta.get("dataset") and their_data.fingerprint() not in (None, meta["dataset"]):
        return None, [{"note": f"{unchecked}: its data ({their_data.shown}) holds other shards than when it "
                                "trained (repacked since?)"}], meta
    notes, seen = [], {"sha": [], "phash": []}
    for m, index in packs:
        ids = None if isinstance(index, str) else view_ids(m, index, theirs.train_split, theirs.train_split,
                                                           theirs.val_split)
        if ids is None:
            notes.append({"note": f"{unchecked} for {m.shown}: "
                                  + (index if isinstance(index, str) else f"its {FILE} does not describe its training split")})
            continue
        seen["sha"].append(ids)
        ph = view_ids(m, index, theirs.train_split, theirs.train_split, theirs.val_split, "phash")
        seen["phash"] += [ph] if ph is not None else []
    trained = {k: np.unique(np.concatenate(v)) if v else np.zeros(0, np.uint64) for k, v in seen.items()}
    return (trained if trained["sha"].size else None), notes, meta


def _evaluated(cfg, manifest: Manifest, splits: Sequence[str], unchecked: str) -> tuple[list, list[dict]]:
    """(this run's evaluated views: (pack, split, sha256 prefixes, pHashes or None), notes)."""
    data = cfg.data
    try:
        ours = _indexed(manifest, data.retries, data.read_timeout_s)
    except SampleIndexError as e:
        raise SampleIndexError(f"{e}; {OPT_OUT}") from None
    evaluated, notes = [], []
    for m, index in ours:
        if isinstance(index, str):
            notes.append({"note": f"{unchecked} for {m.shown}: {index}"})
            continue
        for split in (s for s in splits if s in m.splits):
            ids = view_ids(m, index, split, data.train_split, data.val_split)
            if ids is None:
                notes.append({"note": f"{unchecked} for split '{split}' of {m.shown}: its {FILE} does not describe it"})
                continue
            evaluated.append((m, split, ids, view_ids(m, index, split, data.train_split, data.val_split, "phash")))
    return evaluated, notes


def pretrained_overlap(cfg, manifest: Manifest, splits: Sequence[str]) -> list[dict]:
    """What `check_pretrained` found, one entry per finding: {"split", "count", "near", "total", "fold"
    (the fold of a `data.fold` view, else None), "data" (the pack shown), "source" (`model.pretrained`
    as given, or the ancestor the images were found in), "via" (the sources between: [] for
    `model.pretrained` itself)} for images of an evaluated split the source trained on ("count": the
    same file, or the same picture: pHashes within `bcc.neardup.SAME_PICTURE_BITS`; "near": others with a
    near-identical picture, within `DEFAULT_THRESHOLD`; entries of an older bcc lack it), or {"note": text}
    where a check could not be made. A source that was itself fine-tuned from a bcc run passes on what
    that run trained on: its checkpoint's config names its `model.pretrained`, followed up to
    `MAX_LINEAGE` sources back. Nothing with `data.source_overlap=ignore` (no index is read). Raises
    SampleIndexError for this run's index that cannot be read or was lost (the source's: a note). The
    pictures are grouped over each source's training pHashes and this run's (`picture_roots`): about 10 s
    of one core a million distinct hashes. `bcc.train.fit` stores the list in RUN/pretrained.json
    (`overlap`); `overlap_line` is the one wording of an entry, `overlap_warning` the line RESULTS.md and
    CV.md show."""
    from bcc.weights import resolve_source

    if not cfg.model.pretrained or cfg.data.source_overlap == "ignore":
        return []
    out, via, given, backbone, evaluated = [], [], cfg.model.pretrained, cfg.model.backbone, None
    while given and len(via) < MAX_LINEAGE:
        try:
            source = resolve_source(given, backbone)
        except BccError as e:  # model.pretrained itself: building the model names what is wrong with it
            if via:
                out.append({"note": f"the pretrained source {given} of {via[-1]} is not checked: {e}"})
            break
        unchecked = (f"whether {source.given} (model.pretrained"
                     + (f", the backbone's source via {' <- '.join(reversed(via))}" if via else "")
                     + ") was trained on images this run evaluates is not checked")
        trained, notes, meta = _trained(source, cfg.data, unchecked)
        out += notes
        if trained is not None:
            if evaluated is None:
                evaluated, notes = _evaluated(cfg, manifest, splits, unchecked)
                out += notes
            out += _hits(trained, evaluated, cfg.data, source.given, via)
        model = (meta or {}).get("config", {}).get("model", {})
        via, given, backbone = [*via, source.given], model.get("pretrained"), model.get("backbone", backbone)
    return out


def _hits(trained: dict, evaluated: list, data, given: str, via: list[str]) -> list[dict]:
    same, near = picture_roots([trained["phash"] if trained["phash"].size else None] + [e[3] for e in evaluated])
    out = []
    for k, (m, split, ids, _) in enumerate(evaluated, 1):
        hit, close = np.isin(ids, trained["sha"]), np.zeros(ids.size, bool)
        if same[0] is not None and same[k] is not None:
            hit |= np.isin(same[k], same[0])
            close = np.isin(near[k], near[0]) & ~hit
        if hit.any() or close.any():
            fold = m.fold if m.fold is not None and split in (data.train_split, data.val_split) else None
            out.append({"split": split, "count": int(hit.sum()), "near": int(close.sum()), "total": int(ids.size),
                        "fold": fold, "data": m.shown, "source": given, "via": list(via)})
    return out


def overlap_line(entry: Mapping) -> str:
    """The start-up line of one `pretrained_overlap` entry (`warning: ...` or `note: ...`)."""
    from bcc.neardup import DEFAULT_THRESHOLD, SAME_PICTURE_BITS

    if "note" in entry:
        return f"note: {entry['note']}"
    where = (f"images of split '{entry['split']}'" + (f" (fold {entry['fold']} view)" if entry.get("fold") is not None
                                                       else "") + f" of {entry['data']}")
    near = (f"near-identical pictures (pHash {SAME_PICTURE_BITS + 1}-{DEFAULT_THRESHOLD} bits apart: different "
            "pictures can lie that close, look at them)")
    via = entry.get("via") or []
    who = (f"model.pretrained {entry['source']}" if not via else
           f"{entry['source']}, the pretrained source of {' <- '.join(reversed(via))} (model.pretrained),")
    if not entry["count"]:
        return f"warning: {who} was trained on {near} of {entry['near']} of the {entry['total']} {where}"
    return (f"warning: {who} was trained on {entry['count']} of the {entry['total']} "
            f"{where} (the same file by sha256, or the same picture: pHash within {SAME_PICTURE_BITS} bits)"
            + (f", and on {near} of {entry['near']} more" if entry.get("near") else "")
            + ": scores there are flattered; pretrain on images this run does not evaluate (the same pack and split, "
              "or a pack without them)")


def overlap_warning(found: Mapping[str, Sequence[Mapping]]) -> str:
    """One Markdown warning line for RESULTS.md / CV.md from the `overlap` entries of runs' pretrained.json
    (`found`: run name -> entries), naming per split the images the pretrained source trained on; ""
    when no run has any."""
    parts = []
    for run, entries in found.items():
        hits = [e for e in entries if isinstance(e, Mapping) and "split" in e and e.get("count")]
        if hits:
            parts.append(f"{run}: " + ", ".join(
                f"{e['count']} of {e['total']} images of split '{e['split']}'"
                + (f" (fold {e['fold']} view)" if e.get("fold") is not None else "") for e in hits))
    if not parts:
        return ""
    return ("**Warning: the pretrained source was trained on images these runs evaluate** (the same file or "
            "picture; their scores are flattered): " + "; ".join(parts) + ".")


def check_pretrained(cfg, manifest: Manifest, splits: Sequence[str]) -> list[str]:
    """Warnings for images this run evaluates (`splits` of `manifest`, its val and test) that the bcc run
    behind `cfg.model.pretrained` trained on (the same file or picture): its scores there would be
    flattered, since the backbone (and maybe the heads) already learned those images with their labels.
    The source's data comes from its checkpoint's meta (its config's `data.shards` or `data.sources`, its
    fold view), or from what a bcc export records of it (`bcc.export.read_training_data`), checked
    against the dataset fingerprint recorded there (a pack rebuilt since is not checked, said in a
    note); the images from both sides' sample indexes. Weights of no bcc run (the hub, a file) have no
    record of their data: nothing to check; an export whose record cannot be followed gets a note.
    The lines of `pretrained_overlap`'s entries (`overlap_line`)."""
    return [overlap_line(e) for e in pretrained_overlap(cfg, manifest, splits)]

