"""`bcc.pack`'s process-pool pipeline: the per-file first pass and the shard-writing tasks.

Owns what runs in the worker processes and how work reaches them: `_inspect` (read, sha256, full
decode, pHash, re-encode into the staging folder) over chunks of files, the first pass's compact
per-file columns (`_Records`), the fork pool (`_start_pool`) and ordered, bounded submission
(`_ordered`: at most `window` tasks in flight, results taken in task order, so output does not depend
on the number of workers), and `_write_one_shard` (one shard per task, atomically; a source stored as
read must still match the first pass's size and CRC-32, else `SourceChangedError`). Worker functions
are top-level so a process pool can run them. `bcc.pack` plans the splits and calls these.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bcc.atomic import atomic_path
from bcc.errors import BccError
from bcc.imageio import ImageError, is_image_name, open_image, to_rgb
from bcc.neardup import phash
from bcc.shards import make_sample, sha256_file, write_shard

# formats stored with their own bytes: those timm's wds reader (`jpg;png;webp`) and a plain
# `WebDataset(...).to_tuple("jpg", ...)` read; 8-bit RGB in any other format is stored as PNG (lossless)
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}

_CHUNK = 256  # files per first-pass task (~0.1 s): amortises the pipe and the pool's per-task cost

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total); stages "decode", "write"


class PackError(BccError):
    """Packing cannot go on (bad options, strict mode with skipped files, unsafe paths)."""


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


# One image's first-pass record: (skip reason or None, sha256 digest (32 bytes), pHash, stored extension,
# re-encoded into the staging folder, converted-from mode, source size in bytes, CRC-32 of the source bytes)
_Record = tuple[str | None, bytes | None, int, str | None, bool, str | None, int, int]
_EXTS = ("jpg", "png", "webp")  # codes 1..3 of the `ext` column; 0: skipped


def _read(path: str) -> bytes:
    """The bytes of the file at `path`, by file descriptor: ~5 us a small file, where `open().read()`
    (a buffered file object) takes ~10 and pathlib's `read_bytes()` ~15 (twice per packed file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [os.read(fd, os.fstat(fd).st_size + 1)]
        while parts[-1]:  # to the end, whatever the size said (a short read, a growing file)
            parts.append(os.read(fd, 1 << 20))
        return parts[0] if len(parts) == 2 else b"".join(parts)
    finally:
        os.close(fd)


def _inspect(index: int, path: str, opts: _Options) -> _Record:
    """Read, hash, fully decode and (if needed) re-encode one file: the only read of a source that is
    decoded; never raises. Re-encoded bytes go to the staging folder, not through the result pipe."""
    try:
        data = _read(path)
    except OSError as e:
        return (f"unreadable: {e.strerror or e}", None, 0, None, False, None, 0, 0)
    if not data:
        return ("zero-byte file", None, 0, None, False, None, 0, 0)
    digest = hashlib.sha256(data).digest()
    try:
        info = _decode(data, os.path.splitext(path)[1].lower(), opts)
    except ImageError as e:
        return (e.reason, digest, 0, None, False, None, len(data), 0)
    except Exception as e:  # a decoder bug must not kill a long pack
        return (f"corrupt image: {type(e).__name__}: {e}", digest, 0, None, False, None, len(data), 0)
    encoded = info["data"]
    if encoded is not None:
        with open(os.path.join(opts.staging, f"{index:08d}.{info['ext']}"), "wb") as f:
            f.write(encoded)
    return (None, digest, info["phash"] or 0, info["ext"], encoded is not None, info["converted"], len(data),
            zlib.crc32(data))


# A task's records as columns (what crosses the pipe: a few arrays per chunk, not a tuple per file):
# (first index, skip reasons {offset: reason}, sha256 digests (n x 32 bytes), pHash, ext code, staged,
# size, CRC-32, converted-from modes {offset: mode})
_Chunk = tuple[int, dict[int, str], bytes, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
               dict[int, str]]


def _inspect_chunk(task: tuple[int, list[str], _Options]) -> _Chunk:
    start, paths, opts = task
    n = len(paths)
    skips: dict[int, str] = {}
    converted: dict[int, str] = {}
    sha = bytearray(32 * n)
    ph, ext = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint8)
    staged, size, crc = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.uint32)
    for k, path in enumerate(paths):
        skip, digest, h, e, st, conv, sz, c = _inspect(start + k, path, opts)
        if skip:
            skips[k] = skip
            continue
        sha[32 * k:32 * k + 32] = digest
        ph[k], ext[k], staged[k], size[k], crc[k] = h, 1 + _EXTS.index(e), st, sz, c
        if conv:
            converted[k] = conv
    return start, skips, bytes(sha), ph, ext, staged, size, crc, converted


def _noop() -> None:
    return None


def _warm_worker() -> None:
    # a worker's imports (~0.3 s of CPU, scipy's DCT most of it), made while the parent lists SRC on
    # the other core, not on the first image: at 20k images they were ~5% of the first pass
    import scipy.fftpack  # noqa: F401
    from PIL import Image, ImageOps  # noqa: F401

    Image.preinit()  # the common format plugins, which Image.open would load


def _start_pool(workers: int):
    """A fork pool started now, while the parent is small: forked later, every worker's RSS would
    count the file list again. None for one worker (everything then runs in this process). Returns
    at once: the workers make their imports while the caller goes on."""
    if workers <= 1:
        return None
    import multiprocessing

    # fork where available: workers start at once and callers need no `if __name__ == "__main__"`
    # guard; the workers only run the chunk and shard functions here (PIL, hashlib, tar writing)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_warm_worker)
    pool.submit(_noop)  # with fork, all workers are forked here, in this call
    return pool


def _ordered(pool, fn: Callable[[Any], Any], tasks: Iterable[Any], window: int) -> Iterator[Any]:
    """fn(task) for each task in order, at most `window` tasks in flight (memory stays bounded)."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


class _Records:
    """The first pass's compact per-file columns (about 60 bytes a file; no Python object per file
    beyond the file list, except skip reasons)."""

    def __init__(self, n: int):
        self.sha = np.zeros((n, 32), dtype=np.uint8)
        self.phash = np.zeros(n, dtype=np.uint64)
        self.ext = np.zeros(n, dtype=np.uint8)  # 0: skipped, else 1 + index into _EXTS
        self.staged = np.zeros(n, dtype=bool)
        self.size = np.zeros(n, dtype=np.int64)
        self.crc = np.zeros(n, dtype=np.uint32)
        self.converted = np.zeros(n, dtype=np.uint16)  # 0: stored as read, else 1 + index into modes
        self.modes: list[str] = []
        self.skip: dict[int, str] = {}

    def put(self, chunk: _Chunk) -> int:
        """Store one task's columns (slice assignments); returns the number of files in it."""
        start, skips, sha, ph, ext, staged, size, crc, converted = chunk
        end = start + len(ph)
        self.sha[start:end] = np.frombuffer(sha, dtype=np.uint8).reshape(-1, 32)
        self.phash[start:end], self.ext[start:end], self.staged[start:end] = ph, ext, staged
        self.size[start:end], self.crc[start:end] = size, crc
        for k, reason in skips.items():
            self.skip[start + k] = reason
        for k, mode in converted.items():
            if mode not in self.modes:
                self.modes.append(mode)
            self.converted[start + k] = 1 + self.modes.index(mode)
        return end - start


def _inspect_all(pool, paths: Sequence[str], opts: _Options, workers: int,
                 progress: ProgressFn | None) -> _Records:
    total = len(paths)
    records = _Records(total)
    chunk = max(1, min(_CHUNK, total // max(1, workers * 4)))
    tasks = ((start, list(paths[start:start + chunk]), opts) for start in range(0, total, chunk))
    if progress:
        progress("decode", 0, total)
    done = 0
    for result in _ordered(pool, _inspect_chunk, tasks, window=4 * workers):
        done += records.put(result)
        if progress:
            progress("decode", done, total)
    return records


# ---- writing ----------------------------------------------------------------------------------
class SourceChangedError(PackError):
    """A source file changed, vanished or became unreadable between the first pass and the write."""


def _stored_bytes(path: str, staged: bool, size: int, crc: int, source: str) -> bytes:
    """What a sample stores. A source stored as read is read again (no re-hash: its sha256 is the
    first pass's) and must still have the first pass's size and CRC-32: the bytes written are the
    bytes hashed, or the pack fails naming the file."""
    try:
        data = _read(path)
    except OSError as e:
        if staged:
            raise
        raise SourceChangedError(f"SRC file {source} became unreadable while packing ({e.strerror or e}); "
                                 "run again") from e
    if not staged and (len(data) != size or zlib.crc32(data) != crc):
        raise SourceChangedError(f"SRC file {source} changed while packing ({size} -> {len(data)} bytes"
                                 f"{', other content' if len(data) == size else ''}); run again")
    return data


# (shard path, [(key, ext, path to read, staged, source size, source crc32, json meta)], folds or None)
_ShardTask = tuple[str, list[tuple[str, str, str, bool, int, int, dict[str, Any]]], int | None]


def _write_one_shard(task: _ShardTask) -> tuple[str, int, str, list[int] | None]:
    """Write one shard atomically (temporary name, then rename); (name, count, sha256, fold counts)."""
    path, items, folds = task

    def samples():
        for key, ext, src, staged, size, crc, meta in items:
            yield make_sample(key, ext, _stored_bytes(src, staged, size, crc, meta["source"]), meta)

    with atomic_path(path) as tmp:
        write_shard(tmp, samples())
    fold_counts = None
    if folds:
        in_shard = Counter(meta.get("fold") for *_, meta in items)
        fold_counts = [in_shard.get(k, 0) for k in range(folds)]
    return Path(path).name, len(items), sha256_file(Path(path)), fold_counts
