"""Image class folders -> WebDataset shards + `manifest.json` (the first stage of the data path).

`pack_folders(SRC, OUT)` walks SRC (one top-level folder per class, resolved through the taxonomy)
and, as the walk goes, reads, hashes and decodes every file once in a process pool, splits the samples (seeded, stratified,
duplicates and groups kept together), shuffles each split and writes `{split}-{index:06d}.tar` shards
in parallel plus `manifest.json` and timm's `_info.json`. Bad files are skipped with a reason, never
dropped silently. Output appears atomically: everything is written to a sibling `OUT.tmp-<pid>` and
renamed at the end (each shard also goes to a temporary name first); an error or an interrupt
(`bcc.errors.interrupts_raise`) ends the workers and removes `OUT.tmp-<pid>`, and a killed pack's is
removed by the next pack to OUT once that process is gone. The worker-side pipeline (first
pass, pool, shard tasks) is `bcc.pack_pool`; this module plans the splits and writes the manifest.

Scale: memory is the file list plus ~70 bytes of numpy columns per file (no image bytes, no dict per
file), at most 4 x workers tasks are in flight, and the manifest's long per-file lists are streamed to
side files. Each source is read once: in the first pass every worker appends the bytes each image will
store (the source's own bytes, exactly those hashed, or its re-encoding) to its staging file in
`OUT.tmp-<pid>/_staging`, and the write phase copies those byte ranges into the shards in split and
shuffle order. No source is read, hashed or decoded again (on a cluster file system a second read of
the whole data set), so a source edited after the first pass cannot reach a shard; a staged range that
comes back short fails the pack naming the staging file. Disk: the staging holds one more copy of the
stored images (about the output's size) until the shards are written, and is deleted before the
rename. Output does not depend on the number of workers: tasks are made and their results taken in a
fixed order, and where a worker staged an image does not change its bytes. Between the two parallel
phases, the split's near-duplicate search also runs in the pool (its tables in groups).
"""

from __future__ import annotations

import array
import dataclasses
import glob
import itertools
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bcc import sample_index
from bcc.atomic import replace_durably
from bcc.errors import Interrupted
from bcc.imageio import MAX_IMAGE_PIXELS, PathList, display_path, iter_class_folders
from bcc.manifest import Manifest, split_entry, write_manifest
from bcc.neardup import DEFAULT_THRESHOLD, is_enabled
from bcc.pack_pool import (
    PackError,
    ProgressFn,
    _inspect_all,
    _Options,
    _ordered,
    _SampleMeta,
    _start_pool,
    _stop_pool,
    _write_one_shard,
)
from bcc.shards import shard_sizes
from bcc.split import (
    SPLITS,
    big_unit_warning,
    check_group_scope,
    compile_group_regex,
    deal_folds,
    deal_splits,
    digest_ids,
    fold_warnings,
    join_units,
    parse_split,
    split_warnings,
)
from bcc.taxonomy import Taxonomy

__all__ = ["PackError", "PackResult", "default_workers", "pack_folders"]

# A pack made with default options must feed 2 loader workers on each of up to 8 ranks, one shard each
DEFAULT_MIN_SHARDS = 16


class OutputExistsError(PackError, FileExistsError):
    """OUT exists and is not empty (and `overwrite` was not given), or is not a directory."""


@dataclass(frozen=True)
class PackResult:
    manifest: dict[str, Any]
    out: Path
    counts: dict[str, int]  # files, packed, skipped, converted, upscaled, duplicates, shards
    skipped_by_reason: dict[str, int]
    elapsed_s: float
    images_per_s: float
    stages: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds: scan + first pass (overlapped), split, write, manifest


def default_workers() -> int:
    """Processes `bcc pack` uses by default: the CPUs this process may run on (its affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _fold_entry(labels: np.ndarray, fold_of: np.ndarray, folds: int, seed: int, taxonomy: Taxonomy) -> dict[str, Any]:
    """The manifest's `folds`: K, seed, the splits dealt and per fold its sample and class counts."""
    names = taxonomy.class_names
    class_counts = []
    for f in range(folds):
        per_class = np.bincount(labels[fold_of == f], minlength=len(names))
        class_counts.append({n: int(per_class[i]) for i, n in enumerate(names)})
    return {"k": folds, "seed": seed, "splits": ["train", "val"],
            "counts": [sum(c.values()) for c in class_counts], "class_counts": class_counts}


class _Lazy:
    """A manifest list made on demand (`len` known up front): the writer streams a long one to its
    side file entry by entry, so a million-entry list is never held."""

    def __init__(self, count: int, make: Callable[[], Iterator[dict[str, Any]]]):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.make()


def _imagehash_version() -> str:
    from importlib.metadata import version

    return version("ImageHash")


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r.is_relative_to(src_r) or src_r.is_relative_to(out_r):
        raise PackError(f"OUT {out} and SRC {src} must not contain each other")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExistsError(f"OUT {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise OutputExistsError(f"OUT {out} is not empty; pass --overwrite (overwrite=True) to replace it")


def _commit(tmp: Path, out: Path) -> Path | None:
    """Rename the complete `tmp` to `out`. An existing OUT is renamed aside first and that name returned,
    for the caller to remove once the new OUT is in place (None: there was none). Interrupted between
    the two renames (a signal), the old OUT is put back: OUT is the old pack or the new one, never gone."""
    if not out.exists():
        os.rename(tmp, out)
        return None
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    try:
        os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.rename(old, out)
        raise
    return old


def _remove_stale(out: Path) -> None:
    """Remove `OUT.tmp-PID`/`OUT.old-PID` siblings whose process is gone (a killed pack's leftovers; a
    live PID's, another pack still running, stay; on a shared file system another host's PIDs are unknown
    here, so its leftovers stay until a pack on that host removes them)."""
    for path in out.parent.glob(f"{glob.escape(out.name)}.[to][ml][pd]-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if path.name[len(out.name):].startswith((".tmp-", ".old-")) and pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass  # alive, another user's


def _skipped_note(skipped: Sequence[dict[str, str]]) -> str:
    if not skipped:
        return " (no class folder holds a file)"
    first = skipped[0]
    return f" ({len(skipped)} entries skipped, e.g. {first['path']}: {first['reason']})"


def pack_folders(
    src: str | Path,
    out: str | Path,
    *,
    split: Sequence[float] | str = (0.8, 0.1, 0.1),
    seed: int = 0,
    resize: int | None = None,
    quality: int = 90,
    shard_size: int = 1000,
    min_shards: int = DEFAULT_MIN_SHARDS,
    workers: int = 1,
    group_regex: str | None = None,
    group_scope: str = "dataset",
    taxonomy: Taxonomy | None = None,
    overwrite: bool = False,
    strict: bool = False,
    max_image_pixels: int | None = None,
    near_dup_threshold: int | None = DEFAULT_THRESHOLD,
    folds: int | None = None,
    progress: ProgressFn | None = None,
) -> PackResult:
    """Pack class folders under `src` into WebDataset shards plus `manifest.json` in `out`.

    Raises `TaxonomyError` for an unknown class folder, `OutputExistsError` (a `FileExistsError`) for
    a non-empty `out` without `overwrite`, `SplitError` for bad split options and `PackError` for other
    bad options, a `src` without a usable image, or (with `strict`) any skipped file. `max_image_pixels` defaults to
    `bcc.imageio.MAX_IMAGE_PIXELS` (Pillow's decompression-bomb limit).

    resize: the short side every image is resized to (stored as JPEG). A `resize` whose square is above
    the pixel limit is a PackError naming --resize; an image whose resized form would be (a long strip) is
    skipped ("too large after --resize"); images it upscales are counted (`counts["upscaled"]`) and
    reported in a warning with the largest factor. Files larger than `bcc.imageio.max_file_bytes` of the
    pixel limit are skipped unread ("too large").

    workers: processes that read, hash and decode the sources and write the shards (1: all in this
    process; `default_workers()` is the CPU affinity, `bcc pack`'s default); not an integer >= 1:
    PackError naming it. Each source is read once (an unreadable one is skipped): the bytes hashed are
    the bytes stored, staged in `out`'s temporary sibling until the shards are written, so free room
    for about twice the output is needed while packing (PackError naming the staging file otherwise).
    near_dup_threshold: images whose 64-bit pHashes differ in at most this many bits (default 6)
    stay on one side of the split and of the folds, like exact duplicates; None or -1 switches the
    hashing off. The groups are reported in the manifest's `near_duplicates`. Each per-file list
    naming more than `bcc.manifest.LIST_INLINE` paths goes to its side file `<list>.jsonl`.
    group_scope: "dataset" (a `group_regex` id joins files across class folders) or "class" (ids are
    per class folder, as in image sets whose augmented copies are numbered per class); SplitError else.
    folds: K >= 2 deals the train+val samples into K stratified, group-safe cross-validation folds
    (test stays fixed): `fold` in each sample's json, `fold_counts` per shard, `folds` in the manifest.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    fractions = parse_split(split)
    group_rx = compile_group_regex(group_regex)
    check_group_scope(group_scope)
    taxonomy = taxonomy or Taxonomy.default()
    if resize is not None and resize < 1:
        raise PackError(f"resize must be a positive number of pixels, got {resize}")
    if not 1 <= quality <= 100:
        raise PackError(f"quality must be in 1..100, got {quality}")
    for key, value in (("shard_size", shard_size), ("min_shards", min_shards), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PackError(f"{key} must be an integer >= 1, got {value!r}")
    near_on = is_enabled(near_dup_threshold)  # raises NearDupError on a threshold out of range
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise PackError(f"folds must be an integer >= 2, got {folds!r}")
    if folds is not None and not fractions[0] + fractions[1] > 0:
        raise PackError("folds need train+val samples")
    if not src.is_dir():
        raise PackError(f"SRC {src} is not a directory")
    _check_out(src, out, overwrite)
    limit = max_image_pixels if max_image_pixels is not None else MAX_IMAGE_PIXELS
    if resize and limit and resize * resize > limit:  # would only fail image by image, after a full read
        raise PackError(f"--resize {resize} would make every image at least {resize}x{resize} = {resize * resize} "
                        f"pixels, above the pixel limit {limit} (--max-pixels); the largest --resize within it is "
                        f"{math.isqrt(limit)}")

    pool = _start_pool(workers)  # before the file list exists: see _start_pool
    try:
        return _pack(src, out, pool, workers=workers, fractions=fractions, group_rx=group_rx, taxonomy=taxonomy,
                     opts=_Options(resize, quality, limit, "", phash=near_on), group_scope=group_scope, seed=seed, shard_size=shard_size,
                     min_shards=min_shards, strict=strict, near_dup_threshold=near_dup_threshold if near_on else None,
                     folds=folds, progress=progress, t0=t0,
                     options={"split": list(fractions), "seed": seed, "resize": resize, "quality": quality,
                              "shard_size": shard_size, "min_shards": min_shards, "group_regex": group_regex,
                              "group_scope": group_scope,
                              "max_image_pixels": limit,
                              "near_dup_threshold": near_dup_threshold if near_on else None,
                              "imagehash": _imagehash_version() if near_on else None, "folds": folds})
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _pack(src: Path, out: Path, pool, *, workers: int, fractions, group_rx, group_scope: str, taxonomy: Taxonomy, opts: _Options,
          seed: int, shard_size: int, min_shards: int, strict: bool, near_dup_threshold: int | None,
          folds: int | None, progress: ProgressFn | None, t0: float, options: dict[str, Any]) -> PackResult:
    stages: dict[str, float] = {}
    clock = [time.perf_counter()]

    def stage(name: str) -> None:
        now = time.perf_counter()
        stages[name] = round(now - clock[0], 3)
        clock[0] = now

    skipped: list[dict[str, str]] = []
    warnings_: list[str] = []
    listing = iter_class_folders(src, taxonomy.resolve_folder, skipped, warnings_)  # unknown folder: raises now
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale(out)
    staging = tmp / "_staging"
    committed = False
    try:
        staging.mkdir(parents=True)
        opts = dataclasses.replace(opts, staging=str(staging))
        # the file list, compact: relative paths in their printable form (what every stored name is; a name
        # that is not UTF-8 is read by its own bytes), folder and class per file, made while the first pass
        # runs on what is listed so far
        root = os.path.join(str(src.absolute()), "")  # ends in the separator: a path is root + rel
        rels = PathList()
        folder_id: dict[str, int] = {}
        folder_ids, class_ids = array.array("i"), array.array("i")

        def paths():
            for e in listing:
                rels.append(display_path(e.rel))
                folder_ids.append(folder_id.setdefault(e.folder, len(folder_id)))
                class_ids.append(e.class_index)
                yield root + e.rel

        rec = _inspect_all(pool, paths(), opts, workers, progress, listed=rels.__len__)
        if not rels:  # a pack of no samples trains nothing; empty class folders alone stay warnings
            raise PackError(f"SRC {src}: no images found{_skipped_note(skipped)}")
        scan_skipped = len(skipped)
        # files in sorted order, as the split expects; the walk's order already is, unless a folder name
        # sorts before a sibling's "/" (e.g. "a b" and "a/"): then the columns are permuted, not re-read
        order = None
        if not all(map(str.__lt__, rels, itertools.islice(rels, 1, None))):
            order = np.array(sorted(range(len(rels)), key=rels.__getitem__), dtype=np.int64)
            rels = rels.permuted(order.tolist())
        rec.finish(order)
        folder_names = sorted(folder_id)
        renumber = np.zeros(len(folder_names), dtype=np.int32)
        for k, name in enumerate(folder_names):
            renumber[folder_id[name]] = k
        folder_of = renumber[np.frombuffer(folder_ids, dtype=np.int32)]
        label_of = np.frombuffer(class_ids, dtype=np.int32).copy()
        if order is not None:
            folder_of, label_of = folder_of[order], label_of[order]
        stage("scan + first pass")
        skipped += [{"path": rels[i], "reason": reason} for i, reason in rec.skip.items()]
        if rec.upscaled:  # counted and reported, as conversions are: --resize above the sources' size is rarely meant
            warnings_.append(f"{rec.upscaled} image(s) upscaled by --resize {opts.resize} (up to "
                             f"{opts.resize / rec.upscaled_from:.3g}x, from a {rec.upscaled_from} px short side): "
                             "upscaling adds no detail, only bytes to store and decode")
        skipped.sort(key=lambda s: s["path"])
        if strict and skipped:
            lines = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
            raise PackError(f"{len(skipped)} file(s) would be skipped (--strict):\n{lines}")
        ok = np.flatnonzero(rec.ext > 0)  # sample k is file ok[k]
        if not ok.size:
            raise PackError(f"SRC {src}: no usable images{_skipped_note(skipped)}")
        n = len(ok)
        every = n == len(rec.ext)  # nothing skipped: the columns are the samples' own (no copies)
        labels = label_of if every else label_of[ok]
        packed_folders = set(folder_of[ok].tolist())
        warnings_ += [f"class folder {name!r} has no usable images"
                      for k, name in enumerate(folder_names) if k not in packed_folders]
        per_class = np.bincount(labels, minlength=len(taxonomy.class_names))
        warnings_ += [f"class {c!r} has no samples" for i, c in enumerate(taxonomy.class_names) if not per_class[i]]

        # identical files: one id per distinct sha256
        sha = rec.sha if every else rec.sha[ok]
        exact_id = digest_ids(sha)
        sources = (rels[i] for i in ok.tolist()) if group_rx is not None else None  # read by the regex only
        hashes = rec.phash if every else rec.phash[ok]
        unit_root, unmatched, near = join_units(exact_id, sources, group_rx, hashes, near_dup_threshold, group_scope,
                                                mapper=map if pool is None else pool.map)
        assignment, rng = deal_splits(labels, unit_root, fractions, seed)
        fold_of = None
        fold_info = None
        if folds:
            fold_of = deal_folds(labels, unit_root, folds, seed, include=assignment <= 1)
            fold_info = _fold_entry(labels, fold_of, folds, seed, taxonomy)
            warnings_ += fold_warnings(fold_info["class_counts"])
        if unmatched:
            warnings_.append(f"{unmatched} file name(s) do not match the group regex; each is its own group")
        warnings_ += big_unit_warning(unit_root, fractions, near_dup_threshold, group_rx is not None)

        names = taxonomy.class_names
        targets = [taxonomy.targets(c) for c in range(len(names))]
        stage("split")

        plan = []  # (split, its members in shard order, shard sizes)
        for k, split_name in enumerate(SPLITS):
            members = np.flatnonzero(assignment == k).tolist()
            rng.shuffle(members)  # every shard mixes classes
            plan.append((split_name, np.array(members, dtype=np.int64), shard_sizes(len(members), shard_size,
                                                                                  min_shards)))

        stage_files = [str(staging / name) for name in rec.stage_files]
        meta = _SampleMeta(tuple(names), tuple(folder_names), tuple(targets), near_dup_threshold is not None, folds)
        no_fold = np.full(n, -1, dtype=np.int16)

        def tasks():  # a shard's columns by a few vectorised gathers, its json made by the worker
            for split_name, members, sizes in plan:
                for j, (lo, hi) in enumerate(itertools.pairwise(np.cumsum([0, *sizes]).tolist())):
                    part = members[lo:hi]
                    files = ok[part]
                    cols = {"label": labels[part], "folder": folder_of[files], "ext": rec.ext[files],
                            "stage": rec.stage[files], "offset": rec.offset[files], "length": rec.length[files],
                            "phash": rec.phash[files], "fold": (no_fold if fold_of is None else fold_of)[part],
                            "sha": sha[part]}
                    yield (str(tmp / f"{split_name}-{j:06d}.tar"), stage_files, split_name, lo, cols,
                           [rels[i] for i in files.tolist()], meta)

        written = 0
        results = []
        if progress:
            progress("write", 0, n)
        # each written shard is made durable and renamed by a thread here while the workers write the
        # next ones: a worker waiting on fsync would leave its core idle
        with ThreadPoolExecutor(2) as committer:
            commits = []
            for shard_tmp, *result in _ordered(pool, _write_one_shard, tasks(), window=2 * workers):
                commits.append(committer.submit(replace_durably, shard_tmp, tmp / result[0]))
                results.append(result)
                written += result[1]
                if progress:
                    progress("write", written, n)
            for c in commits:
                c.result()
        shutil.rmtree(staging)  # every stored byte is in the shards now
        splits_info: dict[str, Any] = {}
        split_of = np.array(SPLITS)[assignment]
        for k, (split_name, _members, sizes) in enumerate(plan):
            shards = []
            for name, count, digest, head, fold_counts in results[:len(sizes)]:
                entry = {"path": name, "count": count, "sha256": digest, "bytes": os.path.getsize(tmp / name),
                         "head_sha256": head}
                if folds:
                    entry["fold_counts"] = fold_counts
                shards.append(entry)
            del results[:len(sizes)]
            counts = np.bincount(labels[assignment == k], minlength=len(names))
            splits_info[split_name] = split_entry(shards, {c: int(counts[i]) for i, c in enumerate(names)})
        stage("write")

        duplicates, dup_stats = _duplicates(exact_id, labels, ok, rels, split_of, sha, warnings_)
        warnings_ += split_warnings(splits_info, len(names))
        converted_idx = np.flatnonzero(rec.converted)
        converted = _Lazy(len(converted_idx), lambda: ({"path": rels[i], "mode": rec.modes[rec.converted[i] - 1]}
                                                       for i in converted_idx.tolist()))
        groups = near.groups
        near_list = _Lazy(len(groups), lambda: ({**_near_paths(g, ok, rels, labels), "split": str(split_of[g.members[0]])}
                                                 for g in groups))
        dup_stats["near_duplicate_conflicts"] = sum(len(set(labels[list(g.members)].tolist())) > 1 for g in groups)
        manifest = write_manifest(tmp, taxonomy, splits_info, source=str(src.resolve()), options=options,
                                  skipped=skipped, converted=converted, duplicates=duplicates,
                                  near_duplicates=near_list if near_dup_threshold is not None else None,
                                  folds=fold_info, warnings=warnings_, name=out.name)
        ids = sample_index.prefix64(sha)  # 8 bytes a sample, gathered per split (not sha's 32)
        sample_index.write(Manifest(tmp, manifest), {name: {  # the overlap checks (across sources, pretrained runs)
            "sha": ids[members], "label": labels[members],
            "phash": hashes[members] if near_dup_threshold is not None else None,
            "fold": None if fold_of is None else fold_of[members]} for name, members, _ in plan})
        if pool is not None:
            pool.shutdown()  # done with it: after the rename, an interrupt has nothing left to stop
        old = _commit(tmp, out)
        committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        stage("manifest")
    except BaseException as e:  # an error, or a signal (`bcc.errors.interrupts_raise`)
        if pool is not None:
            _stop_pool(pool)  # first: no worker writes into the folder removed next
        if not committed:
            shutil.rmtree(tmp, ignore_errors=True)
        elif isinstance(e, Interrupted):  # while the old OUT was removed: the new one is complete
            raise Interrupted(e.command, e.signum, f"{out} was written") from None
        raise

    elapsed = time.perf_counter() - t0
    by_reason = Counter(s["reason"].split(":", 1)[0] for s in skipped)
    counts = {"files": len(rels) + scan_skipped,
              "packed": n, "skipped": len(skipped), "converted": len(converted), "upscaled": rec.upscaled,
              "duplicates": len(duplicates), **dup_stats, "near_duplicate_groups": len(groups),
              "shards": sum(len(v["shards"]) for v in manifest["splits"].values())}
    return PackResult(manifest, out, counts, dict(sorted(by_reason.items())), elapsed,
                      n / elapsed if elapsed > 0 else 0.0, stages)


def _near_paths(group, ok: np.ndarray, rels: PathList, labels: np.ndarray) -> dict[str, Any]:
    """A near-duplicate group's manifest entry; its members are sample indices. `conflict`: the group
    spans classes (one image filed under two labels), as for identical files."""
    return {"paths": [rels[int(ok[m])] for m in group.members], "max_distance": group.max_distance,
            "conflict": len(set(labels[list(group.members)].tolist())) > 1}


def _duplicates(exact_id: np.ndarray, labels: np.ndarray, ok: np.ndarray, rels: PathList, split_of: np.ndarray,
                sha: np.ndarray, warnings_: list[str]) -> tuple[_Lazy, dict[str, int]]:
    """Sets of identical files (ordered by first path) as a lazy manifest list, and their totals;
    a set spanning classes is also a warning."""
    sizes = np.bincount(exact_id)
    multi = np.flatnonzero(sizes[exact_id] > 1)  # samples in a set of 2+, ascending (= by path)
    order = multi[np.argsort(exact_id[multi], kind="stable")]
    bounds = np.flatnonzero(np.r_[True, exact_id[order][1:] != exact_id[order][:-1], True])
    sets = [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)] if multi.size else []
    sets.sort(key=lambda m: int(m[0]))
    conflicts = 0
    for m in sets:
        if len(set(labels[m].tolist())) > 1:
            conflicts += 1
            warnings_.append("identical images in different classes: " + ", ".join(rels[int(ok[i])] for i in m))

    def entries():
        for m in sets:
            yield {"sha256": sha[m[0]].tobytes().hex(), "paths": [rels[int(ok[i])] for i in m.tolist()],
                   "split": str(split_of[m[0]]), "conflict": len(set(labels[m].tolist())) > 1}

    return _Lazy(len(sets), entries), {"duplicate_files": int(len(multi)), "duplicate_conflicts": conflicts}
