"""Image class folders -> WebDataset shards + `manifest.json` (the first stage of the data path).

`pack_folders(SRC, OUT)` walks SRC (one top-level folder per class, resolved through the taxonomy),
decodes and hashes every file in parallel, splits the samples (seeded, stratified, duplicates and
groups kept together), shuffles each split and writes `{split}-{index:06d}.tar` shards plus
`manifest.json` and timm's `_info.json`. Bad files are skipped with a reason, never dropped silently.
Output appears atomically: everything is written to a sibling `OUT.tmp-<pid>` and renamed at the end.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcc.errors import BccError
from bcc.imageio import (
    MAX_IMAGE_PIXELS,
    ImageEntry,
    ImageError,
    is_image_name,
    open_image,
    scan_class_folders,
    to_rgb,
)
from bcc.manifest import split_entry, write_manifest
from bcc.neardup import DEFAULT_THRESHOLD, is_enabled, phash
from bcc.shards import make_sample, sha256_file, shard_sizes, write_shard
from bcc.split import SPLITS, assign_folds, assign_splits, compile_group_regex, parse_split, sample_units
from bcc.taxonomy import Taxonomy

__all__ = ["PackError", "PackResult", "pack_folders"]

# formats stored with their own bytes: those timm's wds reader (`jpg;png;webp`) and a plain
# `WebDataset(...).to_tuple("jpg", ...)` read; 8-bit RGB in any other format is stored as PNG (lossless)
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}

# A pack made with default options must feed 2 loader workers on each of up to 8 ranks, one shard each
DEFAULT_MIN_SHARDS = 16
TINY_SPLIT_PER_CLASS = 5  # a val/test split with fewer samples per class than this gets a warning

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total); stages "decode", "write"


class PackError(BccError):
    """Packing cannot go on (bad options, strict mode with skipped files, unsafe paths)."""


class OutputExistsError(PackError, FileExistsError):
    """OUT exists and is not empty (and `overwrite` was not given), or is not a directory."""


@dataclass(frozen=True)
class PackResult:
    manifest: dict[str, Any]
    out: Path
    counts: dict[str, int]  # files, packed, skipped, converted, duplicates, shards
    skipped_by_reason: dict[str, int]
    elapsed_s: float
    images_per_s: float


# ---- per-file work (runs in worker processes) --------------------------------------------------
@dataclass(frozen=True)
class _Options:
    resize: int | None
    quality: int
    max_pixels: int | None
    staging: str
    phash: bool = False  # hash each decoded image for near-duplicate grouping


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk: 8 signature + 8 chunk header + 8 width/height, then bit depth
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else 8


def _encode(img, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def _decode(data: bytes, suffix: str, opts: _Options) -> dict[str, Any]:
    """What to store for one source file: its own bytes (8-bit RGB in a common format) or re-encoded
    RGB (`bcc.imageio.to_rgb`: orientation applied, 16-bit scaled), with what was converted; and,
    when asked, the 64-bit pHash of the source image (`bcc.neardup.phash` of its RGB form)."""
    try:
        img = open_image(data, max_pixels=opts.max_pixels, min_side=opts.resize)
    except ImageError as e:
        if e.is_unidentified and not is_image_name(f"x{suffix}"):
            raise ImageError("non-image file") from e
        if e.is_unidentified:
            raise ImageError(f"corrupt image: {e.reason}") from e
        raise
    with img:
        rgb = functools.cache(lambda: to_rgb(img))  # converted at most once, only when needed
        info = _convert(img, data, opts, rgb)
        info["phash"] = phash(rgb()) if opts.phash else None
        return info


def _convert(img, data: bytes, opts: _Options, rgb: Callable[[], Any]) -> dict[str, Any]:
    from PIL import Image

    fmt, mode = img.format or "", img.mode
    bits16 = fmt == "PNG" and _png_bit_depth(data) == 16
    is_rgb8 = mode == "RGB" and not bits16
    converted = None if is_rgb8 else (f"{mode};16" if bits16 and mode == "RGB" else mode)
    if opts.resize:
        image = rgb()
        w, h = image.size
        s = opts.resize / min(w, h)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        return {"format": fmt, "mode": mode, "converted": converted,
                "ext": "jpg", "data": _encode(image, "JPEG", opts.quality)}
    if is_rgb8:
        if fmt not in _EXTENSIONS:
            # keep the original bytes only in formats every reader knows; others become PNG
            return {"format": fmt, "mode": mode, "converted": f"{mode} ({fmt})",
                    "ext": "png", "data": _encode(rgb(), "PNG", opts.quality)}
        # stored as they are: the reader applies the same orientation (bcc.imageio.decode_rgb)
        return {"format": fmt, "mode": mode, "converted": None, "ext": _EXTENSIONS[fmt], "data": None}
    # converted pixels are stored losslessly (PNG), even from a lossy source: the shard then holds exactly
    # what bcc.imageio.decode_rgb gives for the source file, so pack -> stream equals predict / folder eval
    return {"format": fmt, "mode": mode, "converted": converted, "ext": "png",
            "data": _encode(rgb(), "PNG", opts.quality)}


def _inspect(task: tuple[int, str, _Options]) -> dict[str, Any]:
    """Read, hash, fully decode and (if needed) re-encode one file; never raises."""
    index, path, opts = task
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return {"skip": f"unreadable: {e.strerror or e}"}
    if not data:
        return {"skip": "zero-byte file"}
    digest = hashlib.sha256(data).hexdigest()
    try:
        info = _decode(data, Path(path).suffix.lower(), opts)
    except ImageError as e:
        return {"skip": e.reason, "sha256": digest}
    except Exception as e:  # a decoder bug must not kill a long pack
        return {"skip": f"corrupt image: {type(e).__name__}: {e}", "sha256": digest}
    encoded = info.pop("data")
    if encoded is not None:
        # re-encoded bytes go to disk, not through the result pipe, so memory stays flat
        Path(opts.staging, f"{index:08d}.{info['ext']}").write_bytes(encoded)
    info.update(skip=None, sha256=digest, staged=encoded is not None)
    return info


def _inspect_all(entries: list[ImageEntry], opts: _Options, workers: int, progress: ProgressFn | None):
    tasks = [(i, e.path, opts) for i, e in enumerate(entries)]
    total = len(tasks)
    results: list[dict[str, Any]] = []
    if progress:
        progress("decode", 0, total)
    if workers <= 1 or total < 2:
        it = map(_inspect, tasks)
        pool = None
    else:
        import multiprocessing

        # fork where available: workers start at once and callers need no `if __name__ == "__main__"`
        # guard; the workers only run _inspect (PIL + hashlib), so inherited threads are harmless
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ProcessPoolExecutor(workers, mp_context=ctx)
        chunk = max(1, min(64, total // (workers * 8)))
        it = pool.map(_inspect, tasks, chunksize=chunk)  # ordered: independent of worker count
    try:
        for r in it:
            results.append(r)
            if progress:
                progress("decode", len(results), total)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results


# ---- writing ----------------------------------------------------------------------------------
def _stored_bytes(sample: dict[str, Any], staging: Path) -> bytes:
    if sample["staged"]:
        return (staging / f"{sample['index']:08d}.{sample['ext']}").read_bytes()
    data = Path(sample["path"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != sample["sha256"]:
        raise PackError(f"{sample['source']} changed while packing; run again")
    return data


def _collect(entries: list[ImageEntry], results: list[dict[str, Any]], skipped: list[dict[str, str]]):
    """Worker results -> (samples, converted); skips are appended to `skipped` (sorted by path)."""
    samples: list[dict[str, Any]] = []
    converted: list[dict[str, str]] = []
    for index, (entry, r) in enumerate(zip(entries, results, strict=True)):
        if r["skip"]:
            skipped.append({"path": entry.rel, "reason": r["skip"]})
            continue
        if r["converted"]:
            converted.append({"path": entry.rel, "mode": r["converted"]})
        samples.append({"index": index, "path": entry.path, "source": entry.rel, "folder": entry.folder,
                        "label": entry.class_index, **r})
    skipped.sort(key=lambda s: s["path"])
    return samples, converted


def _write_split(tmp: Path, staging: Path, split_name: str, members: list[dict[str, Any]], taxonomy: Taxonomy,
                 sizes: list[int], on_shard: Callable[[int], None], folds: int | None = None) -> dict[str, Any]:
    """Write one split's shards; returns its manifest entry. With `folds`, samples holding a `fold`
    store it in their json and each shard entry gets `fold_counts` (samples per fold)."""
    names = taxonomy.class_names

    def encoded(start: int, size: int):
        for n, s in enumerate(members[start:start + size], start=start):
            meta = {"class": names[s["label"]], "folder": s["folder"], "source": s["source"],
                    "sha256": s["sha256"], "label": s["label"], **taxonomy.targets(s["label"])}
            if s.get("phash") is not None:
                meta["phash"] = f"{s['phash']:016x}"  # imagehash's hex form
            if s.get("fold") is not None:
                meta["fold"] = s["fold"]
            yield make_sample(f"{split_name}-{n:08d}", s["ext"], _stored_bytes(s, staging), meta)

    shards = []
    start = 0
    for j, size in enumerate(sizes):
        path = tmp / f"{split_name}-{j:06d}.tar"
        write_shard(path, encoded(start, size))
        entry = {"path": path.name, "count": size, "sha256": sha256_file(path)}
        if folds:
            in_shard = Counter(s.get("fold") for s in members[start:start + size])
            entry["fold_counts"] = [in_shard.get(k, 0) for k in range(folds)]
        shards.append(entry)
        start += size
        on_shard(size)
    for s in members:
        s["split"] = split_name
    counts = Counter(names[s["label"]] for s in members)
    return split_entry(shards, {c: counts.get(c, 0) for c in names})


def _find_duplicates(samples: list[dict[str, Any]], warnings_: list[str]) -> list[dict[str, Any]]:
    by_hash: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_hash.setdefault(s["sha256"], []).append(s)
    duplicates = []
    for digest, group in by_hash.items():
        if len(group) > 1:
            conflict = len({s["label"] for s in group}) > 1
            paths = sorted(s["source"] for s in group)
            duplicates.append({"sha256": digest, "paths": paths, "split": group[0]["split"], "conflict": conflict})
            if conflict:
                warnings_.append(f"identical images in different classes: {', '.join(paths)}")
    return sorted(duplicates, key=lambda d: d["paths"][0])


def _split_warnings(splits_info: dict[str, Any], num_classes: int) -> list[str]:
    """Warnings for evaluation splits too small to choose a checkpoint on (counted and named)."""
    out = []
    tiny = TINY_SPLIT_PER_CLASS * num_classes
    for name in SPLITS[1:]:
        n = splits_info[name]["count"]
        if n == 0:
            out.append(f"split {name!r} is empty" + (": training refuses an empty val split" if name == "val"
                                                     else ": a run reports no test metrics"))
        elif n < tiny:
            out.append(f"split {name!r} has only {n} sample(s) (fewer than {TINY_SPLIT_PER_CLASS} per class): "
                       "its metrics will be noisy")
    return out


def _fold_entry(samples: list[dict[str, Any]], fold_of: list[int | None], folds: int, seed: int,
                taxonomy: Taxonomy) -> dict[str, Any]:
    """The manifest's `folds`: K, seed, the splits dealt and per fold its sample and class counts."""
    names = taxonomy.class_names
    per_fold = [Counter() for _ in range(folds)]
    for s, f in zip(samples, fold_of, strict=True):
        if f is not None:
            per_fold[f][names[s["label"]]] += 1
    return {"k": folds, "seed": seed, "splits": ["train", "val"],
            "counts": [sum(c.values()) for c in per_fold],
            "class_counts": [{n: c.get(n, 0) for n in names} for c in per_fold]}


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


def _commit(tmp: Path, out: Path) -> None:
    # the old OUT goes away only once the new one is complete
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


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

    near_dup_threshold: images whose 64-bit pHashes differ in at most this many bits (default 6)
    stay on one side of the split and of the folds, like exact duplicates; None or -1 switches the
    hashing off. The groups are reported in the manifest's `near_duplicates` (in the side file
    `near_duplicates.json` when there are more than `NEAR_DUP_INLINE`).
    folds: K >= 2 deals the train+val samples into K stratified, group-safe cross-validation folds
    (test stays fixed): `fold` in each sample's json, `fold_counts` per shard, `folds` in the manifest.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    fractions = parse_split(split)
    group_rx = compile_group_regex(group_regex)
    taxonomy = taxonomy or Taxonomy.default()
    if resize is not None and resize < 1:
        raise PackError(f"resize must be a positive number of pixels, got {resize}")
    if not 1 <= quality <= 100:
        raise PackError(f"quality must be in 1..100, got {quality}")
    if shard_size < 1 or min_shards < 1 or workers < 1:
        raise PackError("shard_size, min_shards and workers must be >= 1")
    near_on = is_enabled(near_dup_threshold)  # raises NearDupError on a threshold out of range
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise PackError(f"folds must be an integer >= 2, got {folds!r}")
    if folds is not None and not fractions[0] + fractions[1] > 0:
        raise PackError("folds need train+val samples")
    if not src.is_dir():
        raise PackError(f"SRC {src} is not a directory")
    _check_out(src, out, overwrite)
    limit = max_image_pixels if max_image_pixels is not None else MAX_IMAGE_PIXELS

    entries, skipped, warnings_ = scan_class_folders(src, taxonomy.resolve_folder)
    if not entries:  # a pack of no samples trains nothing; empty class folders alone stay warnings
        raise PackError(f"SRC {src}: no images found{_skipped_note(skipped)}")
    scan_skipped = len(skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    staging = tmp / "_staging"
    staging.mkdir(parents=True)
    try:
        opts = _Options(resize, quality, limit, str(staging), phash=near_on)
        results = _inspect_all(entries, opts, workers, progress)
        samples, converted = _collect(entries, results, skipped)
        if strict and skipped:
            lines = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
            raise PackError(f"{len(skipped)} file(s) would be skipped (--strict):\n{lines}")
        if not samples:
            raise PackError(f"SRC {src}: no usable images{_skipped_note(skipped)}")
        packed_folders = {s["folder"] for s in samples}
        warnings_ += [f"class folder {name!r} has no usable images"
                      for name in sorted({e.folder for e in entries} - packed_folders)]
        per_class = Counter(s["label"] for s in samples)
        warnings_ += [f"class {c!r} has no samples" for i, c in enumerate(taxonomy.class_names) if not per_class[i]]

        units = sample_units(samples, group_rx, near_dup_threshold if near_on else None)
        assignment, unmatched, rng = assign_splits(samples, fractions, seed, group_rx, units=units)
        fold_info = None
        if folds:
            fold_of = assign_folds(samples, units, folds, seed, include=[a in (0, 1) for a in assignment])
            for s, f in zip(samples, fold_of, strict=True):
                s["fold"] = f
            fold_info = _fold_entry(samples, fold_of, folds, seed, taxonomy)
        if unmatched:
            warnings_.append(f"{unmatched} file name(s) do not match the group regex; each is its own group")
        splits_info: dict[str, Any] = {}
        written = [0]

        def on_shard(size: int) -> None:
            written[0] += size
            if progress:
                progress("write", written[0], len(samples))

        for k, split_name in enumerate(SPLITS):
            members = [s for s, a in zip(samples, assignment, strict=True) if a == k]
            rng.shuffle(members)  # every shard mixes classes
            splits_info[split_name] = _write_split(tmp, staging, split_name, members, taxonomy,
                                                   shard_sizes(len(members), shard_size, min_shards), on_shard,
                                                   folds)
        duplicates = _find_duplicates(samples, warnings_)
        warnings_ += _split_warnings(splits_info, len(taxonomy.class_names))
        near_groups = [{**g.entry([s["source"] for s in samples]), "split": samples[g.members[0]]["split"]}
                       for g in units.near.groups]

        options = {"split": list(fractions), "seed": seed, "resize": resize, "quality": quality,
                   "shard_size": shard_size, "min_shards": min_shards, "group_regex": group_regex,
                   "max_image_pixels": limit, "near_dup_threshold": near_dup_threshold if near_on else None,
                   "imagehash": _imagehash_version() if near_on else None, "folds": folds}
        manifest = write_manifest(tmp, taxonomy, splits_info, source=str(src.resolve()), options=options,
                                  skipped=skipped, converted=converted, duplicates=duplicates,
                                  near_duplicates=near_groups if near_on else None, folds=fold_info,
                                  warnings=warnings_, name=out.name)
        shutil.rmtree(staging)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    elapsed = time.perf_counter() - t0
    by_reason = Counter(s["reason"].split(":", 1)[0] for s in skipped)
    counts = {"files": len(entries) + scan_skipped,
              "packed": len(samples), "skipped": len(skipped), "converted": len(converted),
              "duplicates": len(duplicates), "near_duplicate_groups": len(units.near.groups),
              "shards": sum(len(v["shards"]) for v in manifest["splits"].values())}
    return PackResult(manifest, out, counts, dict(sorted(by_reason.items())), elapsed,
                      len(samples) / elapsed if elapsed > 0 else 0.0)
