"""The tar bytes of a shard: what `webdataset.TarWriter(f, encoder=False, mtime=0, user="bcc",
group="bcc")` writes, byte for byte, without its per-member cost.

tarfile builds each header in Python (~25 us, three members a sample); here a plain short ASCII name
patches a 512-byte header template made by tarfile itself (name, size, checksum), and any other name
(long, non-ASCII) goes through tarfile's own `tobuf`. Fixed mtime and owner make the same samples give
byte-identical shards. `bcc.shards` owns what a sample holds (`make_sample`, `sample_members`) and
`write_shard`; `bcc.pack_pool` writes the pack's shards through `TarStream.write_members`.
tests/test_pack.py checks the bytes against `webdataset.TarWriter`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from typing import Any

TAR_MTIME = 0
TAR_USER = "bcc"
_MODE = 0o444  # webdataset's default member mode
_ZEROS = bytes(tarfile.BLOCKSIZE)


def _header_template(mtime: int, user: str, group: str, mode: int) -> bytes:
    """tarfile's own 512-byte header for a regular file, fields name/size/chksum to be filled in."""
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode, info.uname, info.gname = 0, mtime, mode, user, group
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class TarStream:
    """Tar members written to the file object `f` (anything with `write(bytes)`); `close()` ends the
    archive. `offset`: bytes written so far."""

    def __init__(self, f, mtime: int = TAR_MTIME, user: str = TAR_USER, group: str = TAR_USER):
        self.f, self.mtime, self.user, self.group = f, mtime, user, group
        t = _header_template(mtime, user, group, _MODE)
        # the fields around name, size and checksum, and their share of the checksum (which counts
        # its own field as 8 spaces): a header is then joined, not summed over 512 bytes
        self.mode_to_uid, self.mtime_field, self.tail = t[100:124], t[136:148], t[156:]
        self.base_sum = sum(self.mode_to_uid) + sum(self.mtime_field) + sum(self.tail) + 8 * 32
        self.offset = 0

    def _header(self, name: str, size: int) -> bytes:
        if len(name) < 100 and name.isascii() and size < 8 ** 11 and "\0" not in name:
            raw, size_field = name.encode("ascii"), b"%011o\0" % size
            checksum = self.base_sum + sum(raw) + sum(size_field)
            return b"".join((raw.ljust(100, b"\0"), self.mode_to_uid, size_field, self.mtime_field,
                             b"%06o\0 " % checksum, self.tail))
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, self.mtime, _MODE, self.user, self.group
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def write_members(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        """One sample's members `{key}.{ext}` (ext, bytes), in the order given: webdataset's is sorted
        by ext (`bcc.shards.sample_members` gives them so)."""
        write, offset = self.f.write, self.offset
        for ext, data in members:
            header = self._header(f"{key}.{ext}", len(data))
            pad = -len(data) % tarfile.BLOCKSIZE
            write(header)
            write(data)
            if pad:
                write(_ZEROS[:pad])
            offset += len(header) + len(data) + pad
        self.offset = offset

    def write(self, sample: dict[str, Any]) -> None:
        """One WebDataset sample: `__key__` and bytes (or str, UTF-8) per extension; keys starting with
        "_" are not written. Raises ValueError for a value of another type (as webdataset does)."""
        members = []
        for k in sorted(sample):  # webdataset's member order
            if k[0] == "_":
                continue
            data = sample[k]
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{k} doesn't map to bytes ({type(data)})")
            members.append((k, data))
        self.write_members(sample["__key__"], members)

    def close(self) -> None:
        # tarfile.close(): two zero blocks, then zeros up to a whole record
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self.f.write(_ZEROS * 2)
        rest = end % tarfile.RECORDSIZE
        if rest:
            self.f.write(bytes(tarfile.RECORDSIZE - rest))
