"""`bcc.pack`'s process-pool pipeline: the per-file first pass and the shard-writing tasks.

Owns what runs in the worker processes and how work reaches them: `_inspect` (read, sha256, full
decode, pHash, re-encode where needed) over chunks of files, each worker appending every stored
image's bytes to its own staging file (`_inspect_chunk`), the first pass's compact per-file columns
(`_Records`: hashes, and where each image's bytes lie in the staging files), the fork pool
(`_start_pool`) and ordered, bounded submission (`_ordered`: at most `window` tasks in flight, results
taken in task order, so output does not depend on the number of workers), and `_write_one_shard` (one
shard per task, from byte ranges of the staging files: sources are read once, in the first pass; the
task carries the shard's numpy columns and the worker makes each sample's json, so the parent does no
per-sample work; the shard is hashed as it is written and left under a temporary name, which the
parent's thread fsyncs and renames while the workers write the next shards). Worker functions are
top-level so a process pool can run them. `bcc.pack` plans the splits and calls these.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bcc.atomic import tmp_sibling
from bcc.errors import BccError, Interrupted
from bcc.imageio import ImageError, is_image_name, max_file_bytes, open_image, read_file, to_rgb
from bcc.neardup import phash
from bcc.shards import HEAD_BYTES, sample_members
from bcc.tar_writer import TarStream

# formats stored with their own bytes: those timm's wds reader (`jpg;png;webp`) and a plain
# `WebDataset(...).to_tuple("jpg", ...)` read; 8-bit RGB in any other format is stored as PNG (lossless)
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the packer's to answer (`bcc.errors.interrupts_raise`)
_CHUNK = 256  # files per first-pass task (~0.1 s): amortises the pipe and the pool's per-task cost
_STAGE_BLOCK = 4 << 20  # staged bytes gathered per write (bounds a worker's memory for large images)

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
        w, h = img.size  # the stored size's area does not depend on the orientation applied below
        s = opts.resize / min(w, h)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        if opts.max_pixels and size[0] * size[1] > opts.max_pixels:  # a long strip: checked before resizing
            raise ImageError(f"too large after --resize: {w}x{h} would become {size[0]}x{size[1]} = "
                             f"{size[0] * size[1]} pixels > limit {opts.max_pixels}")
        image = rgb()
        size = size if image.size == (w, h) else size[::-1]
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        return {"format": fmt, "mode": mode, "converted": converted, "upscaled": min(w, h) if s > 1 else 0,
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
# converted-from mode, the short side it was upscaled from by --resize or 0); `_inspect` returns it with
# the bytes to store
_Record = tuple[str | None, bytes | None, int, str | None, str | None, int]
_EXTS = ("jpg", "png", "webp")  # codes 1..3 of the `ext` column; 0: skipped


def _inspect(path: str, opts: _Options) -> tuple[_Record, bytes | bytearray | None]:
    """Read, hash, fully decode and (if needed) re-encode one file, the only read of a source; never
    raises. Returns its record and the bytes a shard will store (the source's own bytes, exactly those
    hashed, or the re-encoded image; None when skipped)."""
    try:
        data = read_file(path, max_file_bytes(opts.max_pixels))
    except ImageError as e:  # too large: never read
        return (e.reason, None, 0, None, None, 0), None
    except OSError as e:
        return (f"unreadable: {e.strerror or e}", None, 0, None, None, 0), None
    if not data:
        return ("zero-byte file", None, 0, None, None, 0), None
    digest = hashlib.sha256(data).digest()
    try:
        info = _decode(data, os.path.splitext(path)[1].lower(), opts)
    except ImageError as e:
        return (e.reason, digest, 0, None, None, 0), None
    except Interrupted:  # Ctrl-C or SIGTERM while this process decodes (--workers 1): the pack ends
        raise
    except Exception as e:  # a decoder bug must not kill a long pack
        return (f"corrupt image: {type(e).__name__}: {e}", digest, 0, None, None, 0), None
    stored = data if info["data"] is None else info["data"]
    return (None, digest, info["phash"] or 0, info["ext"], info["converted"], info.get("upscaled", 0)), stored


# A task's records as columns (what crosses the pipe: a few arrays per chunk, not a tuple per file, and
# no image bytes): (first index, skip reasons {offset: reason}, sha256 digests (n x 32 bytes), pHash,
# ext code, offset and length of the stored bytes in the staging file, converted-from modes {offset:
# mode}, the staging file's name, (images upscaled by --resize, the smallest short side among them))
_Chunk = tuple[int, dict[int, str], bytes, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, str], str,
               tuple[int, int]]


def _staging_error(path: str, e: OSError) -> PackError:
    return PackError(f"cannot write the staging file {path} ({e.strerror or e}): the pack needs free room "
                     "for one more copy of its output while it runs")


def _inspect_chunk(task: tuple[int, list[str], _Options]) -> _Chunk:
    """`_inspect` over one chunk of files; each stored image is appended to this process's staging file
    (`<staging>/<pid>.bin`: one writer per file, so its offsets are this process's to know)."""
    start, paths, opts = task
    n = len(paths)
    skips: dict[int, str] = {}
    converted: dict[int, str] = {}
    upscaled, smallest = 0, 0
    sha = bytearray(32 * n)
    ph, ext = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint8)
    offset, length = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    name = f"{os.getpid()}.bin"
    staging = os.path.join(opts.staging, name)
    pending: list[bytes] = []  # written in one call per _STAGE_BLOCK: ~2 us an image less than one each
    try:
        with open(staging, "ab", buffering=0) as f:
            at = start_at = f.seek(0, os.SEEK_END)
            for k, path in enumerate(paths):
                (skip, digest, h, e, conv, up), stored = _inspect(path, opts)
                if skip:
                    skips[k] = skip
                    continue
                pending.append(stored)
                sha[32 * k:32 * k + 32] = digest
                ph[k], ext[k], offset[k], length[k] = h, 1 + _EXTS.index(e), at, len(stored)
                at += len(stored)
                if conv:
                    converted[k] = conv
                if up:
                    upscaled, smallest = upscaled + 1, min(smallest or up, up)
                if at - start_at >= _STAGE_BLOCK:
                    _write_all(f, b"".join(pending))
                    pending.clear()
                    start_at = at
            _write_all(f, b"".join(pending))
    except OSError as e:
        raise _staging_error(staging, e) from e
    return start, skips, bytes(sha), ph, ext, offset, length, converted, name, (upscaled, smallest)


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while view:  # an unbuffered write may take less than all (a signal, a full pipe; rare on a file)
        view = view[f.write(view):]


def _noop() -> None:
    return None


def _warm_worker(parent: int) -> None:
    # a worker ends with the packer (a killed `bcc pack` left its pool waiting), and makes its imports
    # while the parent lists SRC, not on the first image (scipy, ~0.25 s of CPU a worker, is no longer
    # one of them: `phash` imports it only for a near-tie)
    from bcc.worker_start import end_with_parent

    end_with_parent(parent)
    # Ctrl-C reaches the whole process group and Slurm signals every process of a step: the packer alone
    # answers (it ends its workers, then removes its temporary folder); a worker's KeyboardInterrupt
    # traceback each was most of the 30 lines one Ctrl-C printed. Blocked since the fork (`_start_pool`),
    # so one that came before this point is dropped here, not raised in the initializer.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
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
    # the workers start with SIGINT/SIGTERM blocked, until _warm_worker ignores them; the parent's are
    # held for the few ms of the forks and then handled as ever
    masked = hasattr(signal, "pthread_sigmask")
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if masked else None
    try:
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_warm_worker, initargs=(os.getpid(),))
        pool.submit(_noop)  # with fork, all workers are forked here, in this call
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)
    return pool


def _stop_pool(pool) -> None:
    """End the pool's workers at once (SIGKILL: they ignore SIGINT/SIGTERM) and wait for them, so that a
    failed or interrupted pack removes a staging folder no worker writes into any more."""
    import time

    pids = list(getattr(pool, "_processes", None) or ())  # ProcessPoolExecutor's; 3.14 has terminate_workers
    manager = getattr(pool, "_executor_manager_thread", None)  # a shutdown without wait forgets it
    pool.shutdown(wait=False, cancel_futures=True)
    # the pool's thread drops the cancelled tasks first (it clears the flag then): killed before, its
    # clean-up failed on them with an InvalidStateError traceback (CPython 3.11; 3.12 skips done futures)
    deadline = time.monotonic() + 2.0
    while (getattr(pool, "_cancel_pending_futures", False) and manager is not None and manager.is_alive()
           and time.monotonic() < deadline):
        time.sleep(0.001)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if manager is not None:  # it reaps them and closes its pipes; left running, it raced the exit's clean-up
        manager.join(timeout=10)


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
    beyond the file list, except skip reasons), in the order the files were listed. Where each stored
    image lies: staging file `stage_files[stage[i]]`, bytes `offset[i]` to `offset[i] + length[i]`.
    Filled chunk by chunk (`put`, the total not known while the listing runs), then `finish`ed. Each
    column grows as one byte buffer that a chunk's values are appended to (a large buffer grows in
    place), so nothing per chunk is kept: a list of per-chunk arrays, concatenated at the end, left
    ~12 MiB of small freed blocks in the heap at 200k files beside the joined columns."""

    _DTYPES = {"sha": np.uint8, "phash": np.uint64, "ext": np.uint8, "stage": np.uint16, "offset": np.int64,
               "length": np.int64, "converted": np.uint16}

    def __init__(self):
        self._buffers = {name: bytearray() for name in self._DTYPES}
        self.modes: list[str] = []
        self.stage_files: list[str] = []  # names in the staging folder, one per process
        self.skip: dict[int, str] = {}
        self.count = 0
        self.upscaled, self.upscaled_from = 0, 0  # images --resize upscaled; the smallest short side among them

    def put(self, chunk: _Chunk) -> int:
        """Keep one task's columns; returns the number of files in it."""
        start, skips, sha, ph, ext, offset, length, converted, stage_file, (upscaled, smallest) = chunk
        n = len(ph)
        if upscaled:
            self.upscaled += upscaled
            self.upscaled_from = min(self.upscaled_from or smallest, smallest)
        if stage_file not in self.stage_files:
            self.stage_files.append(stage_file)
        modes = np.zeros(n, dtype=np.uint16)  # 0: stored as read, else 1 + index into modes
        for k, mode in converted.items():
            if mode not in self.modes:
                self.modes.append(mode)
            modes[k] = 1 + self.modes.index(mode)
        stage = np.full(n, self.stage_files.index(stage_file), dtype=np.uint16)
        for name, values in zip(self._DTYPES, (sha, ph, ext, stage, offset, length, modes), strict=True):
            self._buffers[name] += values if isinstance(values, bytes) else np.ascontiguousarray(
                values, dtype=self._DTYPES[name]).data
        for k, reason in skips.items():
            self.skip[start + k] = reason
        self.count += n
        return n

    def finish(self, order: np.ndarray | None = None) -> _Records:
        """The columns as arrays (`sha` n x 32 uint8, `phash`, `ext` (0: skipped, else 1 + index into
        `_EXTS`), `stage`, `offset`, `length`, `converted`), permuted by `order` (new row k = old row
        order[k]) when given; each is a view of its buffer (no copy) unless permuted."""
        inverse = None
        if order is not None:
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            self.skip = {int(inverse[i]): reason for i, reason in self.skip.items()}
        for name, dtype in self._DTYPES.items():
            column = np.frombuffer(self._buffers.pop(name), dtype=dtype)
            if name == "sha":
                column = column.reshape(-1, 32)
            setattr(self, name, column if order is None else column[order])
        return self


def _inspect_all(pool, paths: Iterable[str], opts: _Options, workers: int,
                 progress: ProgressFn | None, listed: Callable[[], int] = lambda: 0) -> _Records:
    """The first pass over `paths` (absolute, consumed as tasks are made, so a listing that yields them
    runs while the workers decode): chunks of up to `_CHUNK` files, growing from 8 so that small packs
    and the first tasks spread over the workers. `listed()`: files listed so far, the progress total."""
    records = _Records()

    def tasks():
        it = iter(paths)
        start, size = 0, 8
        while chunk := list(itertools.islice(it, size)):
            yield start, chunk, opts
            start += len(chunk)
            size = min(_CHUNK, 2 * size)

    if progress:
        progress("decode", 0, listed())
    done = 0
    for result in _ordered(pool, _inspect_chunk, tasks(), window=4 * workers):
        done += records.put(result)
        if progress:
            progress("decode", done, listed())
    return records


# ---- writing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SampleMeta:
    """What the samples' json of one pack share (sent with every shard task: a few hundred bytes)."""

    class_names: tuple[str, ...]
    folder_names: tuple[str, ...]
    targets: tuple[dict[str, int], ...]  # per class index, `Taxonomy.targets`
    phash: bool  # near-duplicate hashing on: each json has its `phash`
    folds: int | None


# One shard's task: (shard path, staging file paths, split name, the split index of its first sample,
# its samples' columns, their source paths (relative), _SampleMeta). The columns are numpy arrays in
# shard order: label, folder (index into folder_names), ext (code), stage, offset, length, phash, fold
# (-1: none) and sha (n x 32 uint8): the task crosses the pipe as a few buffers, not a dict a sample,
# and the samples' json is made in the worker, in parallel.
_ShardTask = tuple[str, list[str], str, int, dict[str, np.ndarray], list[str], _SampleMeta]


class _HashingSink:
    """The file object a shard is written through: tar members are gathered in memory (`write` is the
    buffer's own C method, no Python call a member) and `drain`ed to the file in blocks of ~1 MiB, with
    the sha256 of every byte taken on the way (the shard is not read back to hash it), and that of its
    first `HEAD_BYTES` (`head`: the manifest's `head_sha256`)."""

    BLOCK = 1 << 20

    def __init__(self, f):
        self.f, self.sha, self.head, self.buf = f, hashlib.sha256(), hashlib.sha256(), bytearray()
        self.head_left = HEAD_BYTES
        self.write = self.buf.extend

    def drain(self, final: bool = False) -> None:
        if final or len(self.buf) >= self.BLOCK:
            if self.head_left:
                part = memoryview(self.buf)[:self.head_left]
                self.head.update(part)
                self.head_left -= len(part)
                part.release()  # the buffer is cleared below: no view may hold it
            self.sha.update(self.buf)
            self.f.write(self.buf)
            self.buf.clear()


def _json_str(s: str) -> str:
    """`json.dumps(s)`, without its call for the common string that needs no escape (a source path)."""
    return f'"{s}"' if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s else json.dumps(s)


def _shard_samples(task: _ShardTask, stored: Callable[[int, int, int], bytes]) -> Iterator[tuple[str, list]]:
    """The shard's samples as (key, members) (`bcc.shards.sample_members`). Their json is what
    `json.dumps` writes for the dict {class, folder, source, sha256, label, *targets, phash, fold}, made
    from per-shard templates (one format call a sample, no dict: ~5 us less a sample, a sixth of the
    write phase); tests/test_pack.py checks it against `bcc.shards.make_sample`."""
    _, _, split_name, start, cols, sources, meta = task
    names, folders = [_json_str(n) for n in meta.class_names], [_json_str(f) for f in meta.folder_names]
    heads = [", " + json.dumps(t)[1:-1] if t else "" for t in meta.targets]  # the targets' members
    hexes = cols["sha"].tobytes().hex()
    columns = (cols["label"].tolist(), cols["folder"].tolist(), cols["ext"].tolist(), cols["stage"].tolist(),
               cols["offset"].tolist(), cols["length"].tolist(), cols["phash"].tolist(), cols["fold"].tolist(), sources)
    for j, (label, folder, code, stage, offset, length, ph, fold, source) in enumerate(zip(*columns, strict=True)):
        sha = hexes[64 * j:64 * j + 64]
        # no head is named like a fixed key (`bcc.taxonomy.SAMPLE_META_KEYS`): the keys are distinct
        fields = (f'"class": {names[label]}, "folder": {folders[folder]}, "source": {_json_str(source)}, '
                  f'"sha256": "{sha}", "label": {label}{heads[label]}'
                  + (f', "phash": "{ph:016x}"' if meta.phash else "")  # imagehash's hex form
                  + (f', "fold": {fold}' if fold >= 0 else ""))
        yield (f"{split_name}-{start + j:08d}",
               sample_members(_EXTS[code - 1], stored(stage, offset, length), fields, label))


def _write_one_shard(task: _ShardTask) -> tuple[str, str, int, str, str, list[int] | None]:
    """Write one shard to a temporary name beside its path from byte ranges of the staging files:
    (temporary path, name, count, sha256, head sha256 (`bcc.shards.HEAD_BYTES`), fold counts). The caller commits it
    (`bcc.atomic.replace_durably`: fsync and rename), off this worker's path. No source is read here:
    each sample stores the bytes the first pass staged. A range shorter than staged (a staging file cut
    or removed under the pack) raises PackError naming it."""
    path, stage_files, *_, cols, _, meta = task
    fds: dict[int, int] = {}

    def stored(stage: int, offset: int, length: int) -> bytes:
        fd = fds.get(stage)
        if fd is None:
            try:
                fd = fds[stage] = os.open(stage_files[stage], os.O_RDONLY)
            except FileNotFoundError as e:
                raise PackError(f"staging file {stage_files[stage]} vanished while packing; run again") from e
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise PackError(f"staging file {stage_files[stage]} lost bytes {offset}..{offset + length} "
                            "while packing (removed or cut by someone else?); run again")
        return data

    tmp = tmp_sibling(Path(path))
    try:
        with open(tmp, "wb", buffering=0) as f:
            sink = _HashingSink(f)
            tar = TarStream(sink)  # = bcc.shards.write_shard's bytes
            for key, members in _shard_samples(task, stored):
                tar.write_members(key, members)
                sink.drain()
            tar.close()
            sink.drain(final=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    fold_counts = np.bincount(cols["fold"][cols["fold"] >= 0], minlength=meta.folds).tolist() if meta.folds else None
    return str(tmp), Path(path).name, len(task[5]), sink.sha.hexdigest(), sink.head.hexdigest(), fold_counts
