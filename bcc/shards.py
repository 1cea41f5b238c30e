"""The shard files of a packed dataset: the sample format, writing, sizing, hashing and reading (`bcc.verify`
checks a pack against its manifest).

Shards are plain WebDataset tars (`{key}.{ext}` + `{key}.json` + `{key}.cls` per sample), their bytes
written by `bcc.tar_writer` (fixed mtime and owner: the same samples give byte-identical shards).

A sample is built by `make_sample` and checked by `check_sample` (the one owner of the per-sample
format, both sides). The image's integrity field is `stored_crc32`: CRC-32 (zlib) of the STORED bytes,
8 hex digits. CRC-32 rather than a cryptographic hash because it guards against accidental damage
(bit rot, truncated copies), not tampering -- the manifest's per-shard sha256 (`bcc pack --verify`)
is the strong check -- and the stream checks every sample on every epoch: zlib's CRC-32 runs at
~1.8 GB/s per core here against ~0.75 GB/s for sha256, and both are far below the decode cost of the
same image. It catches every single-bit flip and every burst up to 32 bits.

A whole shard is fingerprinted by its head: the manifest's `head_sha256` (format 6, sha256 of its first
min(size, `HEAD_BYTES`) bytes, taken by the packer as it writes them) is checked each time `read_range`
opens the shard, before any sample: a shard replaced behind an unchanged manifest (sizes often agree: tar
pads them) is a `ShardReplacedError`; damage is left to the read, which names it (`_check_head`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bcc import remote
from bcc.errors import BccError, Interrupted
from bcc.remote_secrets import quote_bytes
from bcc.tar_writer import TarStream

__all__ = ["HEAD_BYTES", "IMAGE_KEYS", "SampleError", "ShardError", "ShardReplacedError", "check_sample", "count_tar_samples",
           "crc32_hex", "damaged_samples", "file_digests", "make_sample", "read_range", "read_shard", "sample_members",
           "sample_offset", "sha256_file", "shard_sizes", "write_shard"]

# sample entries (extensions) that may hold the image, in the order readers look for them; bcc writes
# only jpg, png and webp since format 2 (what timm's wds reader looks for), older packs hold the others
IMAGE_KEYS = ("jpg", "png", "webp", "jpeg", "bmp", "tif", "tiff", "gif", "ppm", "jp2")


def shard_sizes(n: int, shard_size: int, min_shards: int) -> list[int]:
    """Balanced shard sizes: <= shard_size each, at least min_shards when n allows, differ by <= 1."""
    if n == 0:
        return []
    k = max(math.ceil(n / shard_size), min(min_shards, n))
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file at `path`, read in 1 MiB blocks (shards, pretrained weights)."""
    return file_digests(path)[0]


def file_digests(path: Path) -> tuple[str, str]:
    """(hex SHA-256 of the file at `path`, that of its first min(size, HEAD_BYTES): a shard's
    `head_sha256`), in one read."""
    whole, head = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        first = f.read(HEAD_BYTES)
        whole.update(first)
        head.update(first)
        for block in iter(lambda: f.read(1 << 20), b""):
            whole.update(block)
    return whole.hexdigest(), head.hexdigest()


class SampleError(BccError):
    """A sample whose stored bytes or label disagree with what was written at pack time."""


def crc32_hex(data: bytes) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def make_sample(key: str, ext: str, data: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    """A format-2 WebDataset sample: the image under `ext`, `json` = `meta` plus `stored_crc32`, and
    `cls` = the leaf class index `meta["label"]` as ASCII digits."""
    meta = {**meta, "stored_crc32": crc32_hex(data)}
    return {"__key__": key, ext: data, "json": json.dumps(meta).encode("utf-8"),
            "cls": str(int(meta["label"])).encode("ascii")}


def sample_members(ext: str, data: bytes, fields: str, label: int) -> list[tuple[str, bytes]]:
    """`make_sample`'s members, (ext, bytes) in tar order, from `fields`: the members of the json
    object `meta` as `json.dumps(meta)` writes them, without the braces (callers that write many samples
    build them from templates; tests/test_pack.py checks them against `make_sample`)."""
    json_bytes = f'{{{fields}{", " if fields else ""}"stored_crc32": "{crc32_hex(data)}"}}'.encode("ascii")
    return sorted(((ext, data), ("json", json_bytes), ("cls", b"%d" % label)))


def check_sample(sample: dict[str, Any], meta: dict[str, Any]) -> bytes:
    """The image bytes of a format-2 sample whose json is `meta`, checked against `stored_crc32`, and its
    `cls` against the json's `label`. Raises SampleError naming what disagrees (never for a well-formed
    sample; callers skip this for format-1 packs, whose samples carry no checksum)."""
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        raise SampleError(f"no image entry ({', '.join(IMAGE_KEYS)})")
    data = sample[ext]
    want = meta.get("stored_crc32")
    if not isinstance(want, str):
        raise SampleError("its json has no stored_crc32 (damaged json)")
    got = crc32_hex(data)
    if got != want:
        raise SampleError(f"stored image bytes fail their checksum (crc32 {got} != {want} written at pack time)")
    cls = sample.get("cls")
    if cls is None or cls.strip() != str(meta.get("label")).encode("ascii", "replace"):
        raise SampleError(f"cls entry {cls!r} disagrees with the json label {meta.get('label')!r}")
    return data


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> None:
    """Write WebDataset samples (`__key__` plus raw bytes per extension) as the tar `path`: the same
    bytes as `webdataset.TarWriter` with fixed mtime and owner, so the same samples give the same shard.

    Not atomic on its own: callers write to a temporary name and rename (`bcc.pack` does per shard).
    """
    with open(path, "wb") as f:
        tar = TarStream(f)
        for s in samples:
            tar.write(s)
        tar.close()


# --------------------------------------------------------------------------- verification


def count_tar_samples(path: Path) -> int:
    """Distinct sample keys of the local tar `path` (tarfile's reader, for `bcc.verify`); ShardError
    ("unreadable tar: ...") for a file tarfile cannot read."""
    keys = set()
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if member.isfile():
                    base = member.name.rsplit("/", 1)[-1]
                    keys.add(member.name[: len(member.name) - len(base)] + base.split(".", 1)[0])
    except tarfile.TarError as e:
        raise ShardError(f"unreadable tar: {e}") from None
    return len(keys)


def damaged_samples(path: Path) -> list[str]:
    """`key: reason` for every sample of a format-2 shard that fails `check_sample`, then the read error
    that ended the scan, in the words training uses (a truncated copy, bytes that are no tar at all)."""
    out = []
    try:
        with open(path, "rb") as f:
            for sample in _tar_samples(f, str(path)):
                try:
                    check_sample(sample, json.loads(sample["json"]))
                except (SampleError, KeyError, ValueError) as e:
                    out.append(f"{sample.get('__key__')}: {e}")
    except tarfile.ReadError as e:  # its message says what it is
        out.append(str(e))
    except Interrupted:
        raise
    except Exception as e:  # noqa: BLE001 - a tar error ends the scan; report it with what was found
        out.append(f"unreadable tar: {e}")
    return out


class ShardError(BccError):
    """A shard that is missing, unreadable or disagrees with the manifest, or shards too few or too
    small for the requested batches, ranks and loader workers."""


class ShardReplacedError(ShardError):
    """A shard whose first bytes are not those of the shard the manifest lists (its `head_sha256`)."""


HEAD_BYTES = 64 << 10  # a shard's head, fingerprinted in the manifest (format 6)


def _read_head(stream) -> bytes:
    """The first HEAD_BYTES bytes of a stream (fewer: all it holds)."""
    parts, n = [], 0
    while n < HEAD_BYTES:
        part = stream.read(HEAD_BYTES - n)
        if not part:
            break
        parts.append(part)
        n += len(part)
    return b"".join(parts)


def _damaged_head(shard, head: bytes) -> bool:
    """Whether a shard's `head` (its first bytes, which miss the manifest's head_sha256) shows damage that
    the read names better: shorter than the manifest's size, no tar, a tar header or a sample that fails
    its own checksum. A whole shard of another pack, or another seed's, passes each."""
    whole = len(head) < HEAD_BYTES  # the shard ends inside its head: no member is cut by the window
    size = getattr(shard, "bytes", None)
    if size is not None and len(head) < min(size, HEAD_BYTES):
        return True  # a truncated copy
    samples = []
    try:
        for sample in _tar_samples(io.BytesIO(head), ""):
            samples.append(sample)
    except _CutShort:
        if whole:
            return True
    except Exception:  # noqa: BLE001 - no tar, a failed header checksum, a repeated member: damage
        return True
    try:
        for sample in samples if whole else samples[:-1]:  # the window may cut the last one short
            meta = json.loads(sample["json"])
            if "stored_crc32" in meta:
                check_sample(sample, meta)
    except Exception:  # noqa: BLE001 - no json, not JSON, a failed checksum: damage
        return True
    return False


def _check_head(shard, head: bytes, where: str) -> None:
    """ShardReplacedError unless `head` (the shard's first min(size, HEAD_BYTES) bytes) has the sha256 the
    manifest records, or no record, or differs by damage the read names (`_damaged_head`)."""
    want = shard.head_sha256.lower()
    got = hashlib.sha256(head).hexdigest()
    if got == want or _damaged_head(shard, head):
        return
    split = f"split '{shard.split}': " if getattr(shard, "split", "") else ""
    raise ShardReplacedError(
        f"{split}shard {where} is not the shard the manifest lists: its first {len(head):,} bytes have sha256 "
        f"{got[:12]}..., the manifest's head_sha256 is {want[:12]}... (replaced or re-packed since the manifest "
        "was written); copy it again from the packed output, or repack")


# --------------------------------------------------------------------------- reading


class _NoSeek(BccError):
    """A tar layout the header scan does not handle (global pax header, base-256 size): read through.
    Internal (caught in _read_range); a BccError only because every bcc exception is one."""


def _pax_path(payload: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> <key>=<value>\\n" records), if any."""
    pos, path = 0, None
    while pos < len(payload) and payload[pos:pos + 1] != b"\0":
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        key, _, value = payload[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def sample_offset(path: str, index: int) -> tuple[int | None, int]:
    """(byte offset where sample `index` of a local plain tar starts, samples before it).

    Reads only the 512-byte headers and seeks over the data (tarfile's own scan costs ~20x more per
    member), so a lane that starts inside a shard does not read the samples before its start. The
    offset is that of the sample's first header (a pax or GNU long-name header included). None when the
    shard ends first (the second value then counts its samples). Raises _NoSeek for layouts it leaves
    to a full read."""
    import webdataset as wds  # imported where read: webdataset imports torch, which the packer does not need

    n, key, offset = 0, None, 0
    start, name = None, None  # where the current member's headers begin; a long name from them
    with open(path, "rb") as f:
        while True:
            f.seek(offset)
            block = f.read(512)
            if len(block) < 512 or not block.strip(b"\0"):
                break
            if block[124] & 0x80:
                raise _NoSeek("base-256 size")
            size = int(block[124:136].split(b"\0")[0].strip() or b"0", 8)
            flag = block[156:157]
            following = offset + 512 + -(-size // 512) * 512
            start = offset if start is None else start
            if flag in (b"x", b"L"):
                payload = f.read(size)
                name = (_pax_path(payload) or name) if flag == b"x" else payload.split(b"\0")[0].decode("utf-8")
            elif flag == b"g":
                raise _NoSeek("global pax header")
            elif flag in (b"0", b"\0", b"7"):
                if name is None:
                    prefix = block[345:500].split(b"\0")[0].decode("utf-8") if block[257:262] == b"ustar" else ""
                    base = block[:100].split(b"\0")[0].decode("utf-8")
                    name = f"{prefix}/{base}" if prefix else base
                member_key = wds.tariterators.base_plus_ext(name)[0]
                if member_key != key:
                    n += key is not None
                    key = member_key
                    if n == index:
                        return start, n
                start, name = None, None
            else:  # directories, links: no sample data
                start, name = None, None
            offset = following
    return None, n + (key is not None)


def tar_header_ok(block: bytes) -> bool:
    """Whether a tar header matches its checksum (its byte sum, the checksum field counted as spaces), by
    adler32's low half, (1 + byte sum) mod 65521, at C speed (Python's `sum` costs ~4.5 us a header): a
    header's sum is below 2 x 65521, so only a sum off by exactly 65521 gets through."""
    try:
        stored = int(block[148:156].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored >= 0 and ((zlib.adler32(block) & 0xFFFF) - 1 - sum(block[148:156]) + 256 - stored) % 65521 == 0


class _PutBack:
    """A stream with `head` put back in front of it (a remote stream cannot seek back to a header)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = io.BytesIO(head), stream

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.head.read() + self.stream.read()
        data = self.head.read(n)
        if len(data) < n:
            self.read = self.stream.read  # the head is used up: the stream's own reads from now on
            data += self.stream.read(n - len(data))
        return data


class _CutShort(ShardError, tarfile.ReadError):
    """A tar that ends inside a member (a ReadError too: `read_range` words it as one)."""


def _tar_files(f, path: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream `f`: a local file positioned at a member header,
    or a remote stream (`bcc.remote.open_location`) from its start.

    Parses the 512-byte ustar headers itself (checksum checked, pax and GNU long names read): Python's
    `tarfile` costs ~30 us per member, about as much as decoding a 64 px JPEG for a 3-member sample, and
    stops silently at a bad header past the first, so a corrupt shard would pass for a truncated one.
    A header it leaves to `tarfile` (global pax, base-256 size) hands the rest of the file to webdataset's
    reader from that header on. Skips webdataset's meta files (`__...__`) as its reader does."""
    seekable = isinstance(f, io.BufferedReader)
    offset, name = f.tell() if seekable else 0, None
    first = offset == 0
    while True:
        block = f.read(512)
        if first and block and (len(block) < 512 or block.count(0) < 512 and block[257:262] != b"ustar"
                                and not tar_header_ok(block)):
            # no tar from the first byte on: say what came instead (an error page, an AccessDenied body); a
            # ustar header with a wrong checksum is a damaged shard, named as such below
            what = f"{len(block)} bytes, less than one tar block" if len(block) < 512 else "no tar header at its start"
            raise tarfile.ReadError(f"not a shard: {what} (it begins {quote_bytes(block)})")
        first = False
        if len(block) < 512 or (block[0] == 0 and block.count(0) == 512):
            return  # end of archive (two zero blocks, or the end of the file)
        if not tar_header_ok(block):
            raise tarfile.ReadError(f"corrupt: not a valid tar past byte {offset} (the header there fails its checksum)")
        flag = block[156:157]
        if block[124] & 0x80 or flag == b"g":
            import webdataset as wds

            if seekable:
                f.seek(offset)
            for x in wds.tariterators.tar_file_iterator(f if seekable else _PutBack(block, f),
                                                        handler=wds.reraise_exception):
                yield x["fname"], x["data"]
            return
        size = int(block[124:136].split(b"\0")[0].strip() or b"0", 8)
        padded = -(-size // 512) * 512
        data, _ = f.read(size), f.read(padded - size)  # not read(padded)[:size]: a second copy of the image
        if len(data) < size:
            raise _CutShort(f"the shard ends inside the member at byte {offset}: it looks truncated; copy (or "
                                    "upload) it again from the packed output, or repack it")
        offset += 512 + padded
        if flag in (b"x", b"L"):
            name = (_pax_path(data) or name) if flag == b"x" else data.split(b"\0")[0].decode("utf-8")
            continue
        if flag in (b"0", b"\0", b"7"):
            if name is None:
                prefix = block[345:500].split(b"\0")[0].decode("utf-8") if block[345] and block[257:262] == b"ustar" else ""
                base = block[:100].split(b"\0")[0].decode("utf-8")
                name = f"{prefix}/{base}" if prefix else base
            if name[:2] != "__" or not _META.match(name):
                yield name, data
        name = None  # directories, links: no sample data


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def _group(files: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Consecutive members with one key as one sample, as webdataset's `group_by_keys` + `base_plus_ext` make
    them (extensions lower-cased, a repeat an error, a true `__bad__` entry drops it), at a third of the cost."""
    from webdataset.tariterators import base_plus_ext

    sample: dict | None = None
    for name, data in files:
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)  # the usual name: a dot after the last slash, not first there
        key, ext = (name[:dot], name[dot + 1 :]) if dot > slash + 1 else base_plus_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None and not sample.get("__bad__"):
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {ext} {sample.keys()}")
        sample[ext] = data
    if sample is not None and not sample.get("__bad__"):
        yield sample


def _tar_samples(stream, url: str) -> Iterator[dict]:
    """Samples of a tar stream (positioned at a member header), grouped by key like webdataset's."""
    return _group(_tar_files(stream, url), url)


def _open_samples(shard, where: str, lo: int, seek: bool, timeout_s: float) -> tuple[Any, Iterator[dict], int]:
    """(open stream, its raw samples, index of the first one). A local shard read from `lo` > 0 seeks
    to that sample by its tar headers (`seek`); anything else is read from its start. The shard's head
    is checked against the manifest's `head_sha256` first, where it has one (`_check_head`)."""
    location, start, offset = shard.path, 0, 0
    local = seek and lo > 0 and remote.is_local(location) and Path(location).is_file()
    if local:
        try:
            offset, start = sample_offset(str(location), lo)
            if offset is None:
                return None, iter(()), start
        except _NoSeek:
            offset, start = 0, 0
    stream = open(location, "rb") if local else remote.open_location(location, timeout_s=timeout_s)
    samples_from = stream
    try:
        if getattr(shard, "head_sha256", None):
            if isinstance(stream, io.BufferedReader) and stream.seekable():  # a local file: from the page cache
                _check_head(shard, os.pread(stream.fileno(), HEAD_BYTES, 0), where)
            else:  # read once, put back in front of the rest
                head = _read_head(stream)
                _check_head(shard, head, where)
                samples_from = _PutBack(head, stream)
        if offset:
            stream.seek(offset)
    except BaseException:
        stream.close()
        raise
    return stream, _tar_samples(samples_from, where), start


def read_range(shard, lo: int = 0, hi: int | None = None, drop: frozenset[int] = frozenset(),
               retries: int = remote.DEFAULT_RETRIES, timeout_s: float = remote.HTTP_TIMEOUT_S) -> Iterator[dict]:
    """Raw samples [lo, hi) of one shard in tar order, less `drop`. Any failure names the shard; so does
    a shard shorter than `hi` (naming the first missing sample), or, when read to its end, one whose
    count disagrees with the manifest.

    The shard may be remote (`bcc.remote`: an http(s) URL or a `pipe:` command). A transient read error
    there (a dropped connection, a failed command) re-opens the shard, up to `retries` times with
    backoff (a read silent for `timeout_s` is one), and skips forward by count to the sample that failed: the samples and their order are those
    of an undisturbed read, or the read fails with a ShardError naming the shard and the sample.

    A shard of a cross-validation view (`Manifest.with_fold`, `shard.folds` set) holds only its folds'
    samples: the others are skipped by their json `fold` and not counted, so indices and `count` are
    those of the view. Its lanes read through from the shard's start (the header scan cannot tell folds)."""
    location = shard.path
    where = remote.display(location)
    hi = shard.count if hi is None else hi
    folded = getattr(shard, "folds", None) is not None
    n = 0  # index (in the view) of the next sample
    raw = 0  # samples taken from the tar so far: a re-open skips this many
    attempt = 0
    while True:
        stream = None
        try:
            stream, samples, raw_start = _open_samples(shard, where, lo, not folded and raw == 0, timeout_s)
            if raw == 0:
                raw = n = raw_start
            for i, sample in enumerate(samples, start=raw_start):
                if i < raw:
                    continue  # a re-open: read again up to the sample that failed
                raw += 1
                if folded and not shard.is_kept(json.loads(sample["json"])):
                    continue
                if lo <= n < hi and n not in drop:
                    yield sample
                n += 1
                if n >= hi and hi < shard.count:
                    break  # the rest belongs to someone else: stop reading
            else:
                if hasattr(stream, "check_exit"):  # a pipe: read to the shard's end: did the command succeed?
                    stream.check_exit()
            break
        except ShardReplacedError:
            raise  # its message says what it is
        except Exception as e:
            if remote.is_local(location) or not remote.is_transient(e) or attempt >= retries or remote.is_stopping():
                tried = f" (after {attempt} retr{'y' if attempt == 1 else 'ies'})" if attempt else ""
                plain = isinstance(e, (remote.RemoteError, tarfile.ReadError))  # their messages say what it is
                detail = str(e) if plain else remote.redact(f"{type(e).__name__}: {e}")
                raise ShardError(f"cannot read shard {where} at sample {raw}{tried}: {detail}") from None
            attempt += 1
            remote.pause(remote.retry_delay(attempt))
        finally:
            if stream is not None:
                stream.close()
    if n < hi or (hi == shard.count and n != shard.count):
        missing = f" (it ends before sample {n}: a truncated copy?)" if n < shard.count else ""
        raise ShardError(f"shard {where} holds {n} samples but the manifest says {shard.count}{missing}; copy (or "
                         "upload) it again from the packed output, or repack it")


def read_shard(shard) -> Iterator[dict]:
    """All raw samples of one shard, count checked against the manifest."""
    return read_range(shard)
