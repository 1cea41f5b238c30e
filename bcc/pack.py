"""Image class folders -> WebDataset shards + `manifest.json` (the first stage of the data path).

`pack_folders(SRC, OUT)` walks SRC (one top-level folder per class, resolved through the taxonomy),
decodes and hashes every file in parallel, splits the samples (seeded, stratified, duplicates and
groups kept together), shuffles each split and writes `{split}-{index:06d}.tar` shards plus
`manifest.json` and timm's `_info.json`. Bad files are skipped with a reason, never dropped silently.
Output appears atomically: everything is written to a sibling `OUT.tmp-<pid>` and renamed at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import stat
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bcc.taxonomy import Taxonomy

__all__ = [
    "FORMAT",
    "SPLITS",
    "PackError",
    "PackResult",
    "ShardCheck",
    "VerifyResult",
    "pack_folders",
    "parse_split",
    "verify_shards",
]

FORMAT = "bcc-shards/1"
SPLITS = ("train", "val", "test")

# Fixed tar header fields so that the same inputs and seed give byte-identical shards.
_TAR_MTIME = 0
_TAR_USER = "bcc"

_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp",
               "GIF": "gif", "PPM": "ppm", "JPEG2000": "jp2"}
_LOSSY = {"JPEG", "MPO", "WEBP", "JPEG2000"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                   ".pgm", ".pbm", ".jp2", ".j2k", ".dib"}

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total); stages "decode", "write"


class PackError(RuntimeError):
    """Packing cannot go on (bad options, strict mode with skipped files, unsafe paths)."""


@dataclass(frozen=True)
class PackResult:
    manifest: dict[str, Any]
    out: Path
    counts: dict[str, int]  # files, packed, skipped, converted, duplicates, shards
    skipped_by_reason: dict[str, int]
    elapsed_s: float
    images_per_s: float


@dataclass(frozen=True)
class ShardCheck:
    path: Path
    status: str  # "ok", "mismatch", "missing" or "extra"
    detail: str = ""


@dataclass(frozen=True)
class VerifyResult:
    out: Path
    shards: list[ShardCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.shards)

    @property
    def mismatches(self) -> list[ShardCheck]:
        return [s for s in self.shards if s.status != "ok"]


# ---- options ----------------------------------------------------------------------------------
def parse_split(value: str | Sequence[float]) -> tuple[float, float, float]:
    """`"0.8,0.1,0.1"` or a 3-sequence -> validated (train, val, test) fractions."""
    if isinstance(value, str):
        try:
            parts = [float(p) for p in value.split(",")]
        except ValueError as e:
            raise PackError(f"split must be three comma-separated numbers, got {value!r}") from e
    else:
        parts = [float(p) for p in value]
    if len(parts) != 3:
        raise PackError(f"split needs three fractions (train,val,test), got {len(parts)}: {value!r}")
    if any(not math.isfinite(p) or p < 0 for p in parts):
        raise PackError(f"split fractions must be non-negative, got {value!r}")
    if abs(sum(parts) - 1.0) > 1e-6:
        raise PackError(f"split fractions must sum to 1, got {value!r} (sum {sum(parts):g})")
    if parts[0] <= 0:
        raise PackError(f"the train fraction must be > 0, got {value!r}")
    return (parts[0], parts[1], parts[2])


def compile_group_regex(pattern: str | None) -> re.Pattern | None:
    """Compile `--group-regex`; it must have a capturing group (the group id, e.g. a patient)."""
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise PackError(f"group regex {pattern!r} does not compile: {e}") from e
    if rx.groups < 1:
        raise PackError(f"group regex {pattern!r} needs a capturing group, e.g. '^(P\\d+)_'")
    return rx


# ---- scanning ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    path: str  # absolute
    rel: str  # relative to SRC, posix
    folder: str
    class_index: int


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _scan(src: Path, taxonomy: Taxonomy):
    """Class folders -> candidate files; returns (entries, skipped, warnings)."""
    root = src.resolve()
    skipped: list[dict[str, str]] = []
    warnings_: list[str] = []
    folders: list[tuple[str, int]] = []
    for item in sorted(os.scandir(src), key=lambda e: e.name):
        if item.name.startswith("."):
            continue
        if item.is_dir(follow_symlinks=True):
            folders.append((item.name, -1))
        else:
            skipped.append({"path": item.name, "reason": "not in a class folder"})
    # every folder is resolved before any work, so a typo fails fast
    folders = [(name, taxonomy.resolve_folder(name)) for name, _ in folders]

    entries: list[_Entry] = []
    for name, class_index in folders:
        top = src / name
        if top.is_symlink() and not _is_within(top.resolve(), root):
            skipped.append({"path": name, "reason": f"symlink outside SRC: -> {top.resolve()}"})
            continue
        found = 0
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                sub = here / d
                if sub.is_symlink():
                    rel = sub.relative_to(src).as_posix()
                    target = sub.resolve()
                    found += 1
                    if not _is_within(target, root):
                        skipped.append({"path": rel, "reason": f"symlink outside SRC: -> {target}"})
                    else:
                        skipped.append({"path": rel, "reason": "symlinked folder not followed"})
                    continue
                keep.append(d)
            dirnames[:] = keep
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                found += 1
                path = here / f
                rel = path.relative_to(src).as_posix()
                if path.is_symlink():
                    target = path.resolve()
                    if not target.exists():
                        skipped.append({"path": rel, "reason": f"broken symlink: -> {target}"})
                        continue
                    if not _is_within(target, root):
                        skipped.append({"path": rel, "reason": f"symlink outside SRC: -> {target}"})
                        continue
                try:
                    mode = path.stat().st_mode
                except OSError as e:
                    skipped.append({"path": rel, "reason": f"unreadable: {e.strerror or e}"})
                    continue
                if not stat.S_ISREG(mode):  # a FIFO would block the reader forever
                    skipped.append({"path": rel, "reason": "not a regular file"})
                    continue
                entries.append(_Entry(str(path.absolute()), rel, name, class_index))
        if found == 0:
            warnings_.append(f"class folder {name!r} is empty")
    entries.sort(key=lambda e: e.rel)
    return entries, skipped, warnings_


# ---- per-file work (runs in worker processes) --------------------------------------------------
@dataclass(frozen=True)
class _Options:
    resize: int | None
    quality: int
    max_pixels: int | None
    staging: str


class _Skip(Exception):
    pass


@contextmanager
def _no_pil_bomb_check():
    # the pixel limit is enforced by _decode with a clear message, so Pillow's own check is off here
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk: 8 signature + 8 chunk header + 8 width/height, then bit depth
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else 8


def _to_rgb(img):
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grey: keep the high byte (Pillow's plain convert would clip everything above 255)
        import numpy as np

        arr = np.asarray(img).astype(np.uint32) >> 8
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode != "RGB":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notice
            img = img.convert("RGB")
    return img


def _encode(img, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def _decode(data: bytes, suffix: str, opts: _Options) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    with _no_pil_bomb_check():
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            if suffix in _IMAGE_SUFFIXES:
                raise _Skip("corrupt image: cannot identify image format") from e
            raise _Skip("non-image file") from e
        except Exception as e:
            raise _Skip(f"corrupt image: {e}") from e
        fmt, mode = img.format or "", img.mode
        width, height = img.size
        if opts.max_pixels and width * height > opts.max_pixels:
            raise _Skip(f"decompression bomb: {width * height} pixels > limit {opts.max_pixels}")
        scale = None
        if opts.resize:
            scale = opts.resize / min(width, height)
            if scale < 1:
                # JPEG can decode straight at 1/2, 1/4, 1/8 size: most of the resize speed-up
                img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        try:
            img.load()  # full decode: catches truncated and corrupt data
        except Exception as e:
            raise _Skip(f"corrupt image: {e}") from e

        bits16 = fmt == "PNG" and _png_bit_depth(data) == 16
        is_rgb8 = mode == "RGB" and not bits16
        converted = None if is_rgb8 else (f"{mode};16" if bits16 and mode == "RGB" else mode)
        if opts.resize:
            rgb = _to_rgb(img)
            w, h = rgb.size
            s = opts.resize / min(w, h)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            if size != rgb.size:
                rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            return {"format": fmt, "mode": mode, "converted": converted,
                    "ext": "jpg", "data": _encode(rgb, "JPEG", opts.quality)}
        if is_rgb8:
            if fmt not in _EXTENSIONS:
                # keep the original bytes only in formats every reader knows; others become PNG
                return {"format": fmt, "mode": mode, "converted": f"{mode} ({fmt})",
                        "ext": "png", "data": _encode(_to_rgb(img), "PNG", opts.quality)}
            return {"format": fmt, "mode": mode, "converted": None, "ext": _EXTENSIONS[fmt], "data": None}
        target = "JPEG" if fmt in _LOSSY else "PNG"
        return {"format": fmt, "mode": mode, "converted": converted,
                "ext": "jpg" if target == "JPEG" else "png",
                "data": _encode(_to_rgb(img), target, opts.quality)}


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
    except _Skip as e:
        return {"skip": str(e), "sha256": digest}
    except Exception as e:  # a decoder bug must not kill a long pack
        return {"skip": f"corrupt image: {type(e).__name__}: {e}", "sha256": digest}
    encoded = info.pop("data")
    if encoded is not None:
        # re-encoded bytes go to disk, not through the result pipe, so memory stays flat
        Path(opts.staging, f"{index:08d}.{info['ext']}").write_bytes(encoded)
    info.update(skip=None, sha256=digest, staged=encoded is not None)
    return info


def _inspect_all(entries: list[_Entry], opts: _Options, workers: int, progress: ProgressFn | None):
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


# ---- splitting --------------------------------------------------------------------------------
def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    quotas = [n * f for f in fractions]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


def _assign_splits(samples: list[dict[str, Any]], fractions, seed: int, group_rx: re.Pattern | None):
    """Split index per sample. Units (duplicate sets and regex groups, via union-find) never straddle."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first_of: dict[tuple[str, str], int] = {}
    unmatched = 0
    for i, s in enumerate(samples):
        keys = [("sha", s["sha256"])]
        if group_rx is not None:
            m = group_rx.search(Path(s["source"]).name)
            if m and m.group(1) is not None:
                keys.append(("group", m.group(1)))
            else:
                unmatched += 1
        for key in keys:
            if key in first_of:
                union(first_of[key], i)
            else:
                first_of[key] = i

    units: dict[int, list[int]] = {}
    for i in range(len(samples)):
        units.setdefault(find(i), []).append(i)
    # a unit spanning classes (a cross-class duplicate or a patient in two folders) is stratified
    # under its most common class
    by_class: dict[int, list[list[int]]] = {}
    for members in units.values():
        votes = Counter(samples[i]["label"] for i in members)
        cls = min(votes, key=lambda c: (-votes[c], c))
        by_class.setdefault(cls, []).append(members)

    rng = random.Random(seed)
    assignment = [0] * len(samples)
    for cls in sorted(by_class):
        cls_units = sorted(by_class[cls], key=lambda m: m[0])
        rng.shuffle(cls_units)
        cls_units.sort(key=len, reverse=True)  # big units first; singletons then fill targets exactly
        targets = _largest_remainder(sum(len(u) for u in cls_units), fractions)
        filled = [0, 0, 0]
        allowed = [k for k, f in enumerate(fractions) if f > 0]
        for members in cls_units:
            k = max(allowed, key=lambda k: (targets[k] - filled[k], fractions[k], -k))
            filled[k] += len(members)
            for i in members:
                assignment[i] = k
    return assignment, unmatched, rng


def _shard_sizes(n: int, shard_size: int, min_shards: int) -> list[int]:
    """Balanced shard sizes: <= shard_size each, at least min_shards when n allows, differ by <= 1."""
    if n == 0:
        return []
    k = max(math.ceil(n / shard_size), min(min_shards, n))
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


# ---- writing ----------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> None:
    import webdataset as wds

    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=_TAR_MTIME, user=_TAR_USER, group=_TAR_USER)
        try:
            for s in samples:
                writer.write(s)
        finally:
            writer.close()


def _stored_bytes(sample: dict[str, Any], staging: Path) -> bytes:
    if sample["staged"]:
        return (staging / f"{sample['index']:08d}.{sample['ext']}").read_bytes()
    data = Path(sample["path"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != sample["sha256"]:
        raise PackError(f"{sample['source']} changed while packing; run again")
    return data


def _collect(entries: list[_Entry], results: list[dict[str, Any]], skipped: list[dict[str, str]]):
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
                 sizes: list[int], on_shard: Callable[[int], None]) -> dict[str, Any]:
    """Write one split's shards; returns its manifest entry."""
    names = taxonomy.class_names

    def encoded(start: int, size: int):
        for n, s in enumerate(members[start:start + size], start=start):
            meta = {"class": names[s["label"]], "folder": s["folder"], "source": s["source"],
                    "sha256": s["sha256"], "label": s["label"], **taxonomy.targets(s["label"])}
            yield {"__key__": f"{split_name}-{n:08d}", s["ext"]: _stored_bytes(s, staging),
                   "json": json.dumps(meta).encode("utf-8")}

    shards = []
    start = 0
    for j, size in enumerate(sizes):
        path = tmp / f"{split_name}-{j:06d}.tar"
        _write_shard(path, encoded(start, size))
        shards.append({"path": path.name, "count": size, "sha256": _sha256_file(path)})
        start += size
        on_shard(size)
    for s in members:
        s["split"] = split_name
    counts = Counter(names[s["label"]] for s in members)
    return {"count": len(members), "class_counts": {c: counts.get(c, 0) for c in names}, "shards": shards}


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


def _timm_info(name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """timm's `_info.json` (read by timm.data.readers.reader_wds): per split name, size and shards."""
    splits = {
        k: {"name": k, "num_samples": s["count"], "filenames": [sh["path"] for sh in s["shards"]],
            "shard_lengths": [sh["count"] for sh in s["shards"]]}
        for k, s in manifest["splits"].items()
    }
    return {"name": name, "num_classes": len(manifest["classes"]), "classes": manifest["classes"], "splits": splits}


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if _is_within(out_r, src_r) or _is_within(src_r, out_r):
        raise PackError(f"OUT {out} and SRC {src} must not contain each other")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"OUT {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"OUT {out} is not empty; pass --overwrite (overwrite=True) to replace it")


def _commit(tmp: Path, out: Path) -> None:
    # the old OUT goes away only once the new one is complete
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def pack_folders(
    src: str | Path,
    out: str | Path,
    *,
    split: Sequence[float] | str = (0.8, 0.1, 0.1),
    seed: int = 0,
    resize: int | None = None,
    quality: int = 90,
    shard_size: int = 1000,
    min_shards: int = 1,
    workers: int = 1,
    group_regex: str | None = None,
    taxonomy: Taxonomy | None = None,
    overwrite: bool = False,
    strict: bool = False,
    max_image_pixels: int | None = None,
    progress: ProgressFn | None = None,
) -> PackResult:
    """Pack class folders under `src` into WebDataset shards plus `manifest.json` in `out`.

    Raises `TaxonomyError` for an unknown class folder, `FileExistsError` for a non-empty `out`
    without `overwrite`, and `PackError` for bad options or (with `strict`) any skipped file.
    `max_image_pixels` defaults to Pillow's `Image.MAX_IMAGE_PIXELS`.
    """
    from PIL import Image

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
    if not src.is_dir():
        raise PackError(f"SRC {src} is not a directory")
    _check_out(src, out, overwrite)
    limit = max_image_pixels if max_image_pixels is not None else Image.MAX_IMAGE_PIXELS

    entries, skipped, warnings_ = _scan(src, taxonomy)
    scan_skipped = len(skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    staging = tmp / "_staging"
    staging.mkdir(parents=True)
    try:
        results = _inspect_all(entries, _Options(resize, quality, limit, str(staging)), workers, progress)
        samples, converted = _collect(entries, results, skipped)
        if strict and skipped:
            lines = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
            raise PackError(f"{len(skipped)} file(s) would be skipped (--strict):\n{lines}")
        packed_folders = {s["folder"] for s in samples}
        warnings_ += [f"class folder {name!r} has no usable images"
                      for name in sorted({e.folder for e in entries} - packed_folders)]
        per_class = Counter(s["label"] for s in samples)
        warnings_ += [f"class {c!r} has no samples" for i, c in enumerate(taxonomy.class_names) if not per_class[i]]

        assignment, unmatched, rng = _assign_splits(samples, fractions, seed, group_rx)
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
                                                   _shard_sizes(len(members), shard_size, min_shards), on_shard)
        duplicates = _find_duplicates(samples, warnings_)

        from bcc import __version__

        manifest = {
            "format": FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "bcc_version": __version__,
            "source": str(src.resolve()),
            "options": {"split": list(fractions), "seed": seed, "resize": resize, "quality": quality,
                        "shard_size": shard_size, "min_shards": min_shards, "group_regex": group_regex,
                        "max_image_pixels": limit},
            "taxonomy": taxonomy.to_dict(),
            "classes": list(taxonomy.class_names),
            "splits": splits_info,
            "skipped": skipped,
            "converted": converted,
            "duplicates": duplicates,
            "warnings": warnings_,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / "_info.json").write_text(json.dumps(_timm_info(out.name, manifest), indent=2) + "\n",
                                        encoding="utf-8")
        shutil.rmtree(staging)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    elapsed = time.perf_counter() - t0
    by_reason = Counter(s["reason"].split(":", 1)[0] for s in skipped)
    counts = {"files": len(entries) + scan_skipped,
              "packed": len(samples), "skipped": len(skipped), "converted": len(converted),
              "duplicates": len(duplicates),
              "shards": sum(len(v["shards"]) for v in manifest["splits"].values())}
    return PackResult(manifest, out, counts, dict(sorted(by_reason.items())), elapsed,
                      len(samples) / elapsed if elapsed > 0 else 0.0)


# ---- verification -----------------------------------------------------------------------------
def _count_tar_samples(path: Path) -> int:
    keys = set()
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if member.isfile():
                base = member.name.rsplit("/", 1)[-1]
                keys.add(member.name[: len(member.name) - len(base)] + base.split(".", 1)[0])
    return len(keys)


def verify_shards(out: str | Path) -> VerifyResult:
    """Re-hash every shard of a packed dataset against its manifest and recount its samples."""
    from bcc.manifest import Manifest

    out = Path(out)
    manifest = Manifest.load(out)
    checks: list[ShardCheck] = []
    listed: set[str] = set()
    for split_name in manifest.splits:
        for shard in manifest.split(split_name).shards:
            listed.add(shard.path.name)
            if not shard.path.is_file():
                checks.append(ShardCheck(shard.path, "missing", "listed in manifest.json but not on disk"))
                continue
            digest = _sha256_file(shard.path)
            if digest != shard.sha256:
                checks.append(ShardCheck(shard.path, "mismatch",
                                         f"sha256 {digest[:12]}… != manifest {shard.sha256[:12]}…"))
                continue
            try:
                count = _count_tar_samples(shard.path)
            except (tarfile.TarError, OSError) as e:
                checks.append(ShardCheck(shard.path, "mismatch", f"unreadable tar: {e}"))
                continue
            if count != shard.count:
                checks.append(ShardCheck(shard.path, "mismatch", f"{count} samples, manifest says {shard.count}"))
                continue
            checks.append(ShardCheck(shard.path, "ok"))
    for path in sorted(manifest.root.glob("*.tar")):
        if path.name not in listed:
            checks.append(ShardCheck(path.resolve(), "extra", "not listed in manifest.json"))
    return VerifyResult(manifest.root, checks)
