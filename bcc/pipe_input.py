"""Image paths that are not regular files: a pipe is read whole, anything else is refused.

`bcc predict <(convert x.tif png:-)`, `bcc predict /dev/stdin < x.png` and a named FIFO with a program
writing into it are pipes: their bytes are read here, once, so that `bcc.imageio.open_image` decodes
them like any file's. Opening a FIFO blocks until something opens it for writing, so a FIFO nobody writes
to (`mkfifo odd/x.jpg`) hung `bcc predict` forever: it is opened without blocking and refused when no
writer holds it after `WRITER_WAIT_S`. A writer that is there but slow (a converter still working) is
waited for, as `cat` would. A device (`/dev/zero`, a terminal), a socket or a folder is no image file:
refused unread, with its kind named.
"""

from __future__ import annotations

import os
import select
import stat

from bcc.imageio import ImageError

__all__ = ["WRITER_WAIT_S", "read_pipe"]

WRITER_WAIT_S = 1.0  # how long a FIFO may stay without writer and bytes before it is refused
_CHUNK = 1 << 20

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def read_pipe(path: str | os.PathLike, max_bytes: int | None) -> bytearray | None:
    """The bytes of `path` when it is a pipe (FIFO), None when it is a regular file (read it as usual).

    Raises `ImageError` naming the file for a FIFO without a writer ("FIFO with no writer: ..."), for
    more than `max_bytes` bytes (`bcc.imageio.max_file_bytes`), for any other kind of file (device,
    socket) and as `os` fails (missing, permissions)."""
    try:
        mode = os.stat(path).st_mode  # follows links: /dev/stdin and /dev/fd/N lead to the pipe itself
    except OSError as e:
        raise ImageError(f"unreadable: {e.strerror or e}", path) from e
    if stat.S_ISREG(mode):
        return None
    if not stat.S_ISFIFO(mode):
        kind = next((name for is_kind, name in _KINDS if is_kind(mode)), "not a regular file")
        raise ImageError(f"not a regular file: {kind}", path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a blocking open waits for a writer, forever
    except OSError as e:
        raise ImageError(f"unreadable: {e.strerror or e}", path) from e
    try:
        # readable: bytes came, or a writer came and went; else the wait runs out
        select.select([fd], [], [], WRITER_WAIT_S)
        try:
            first = os.read(fd, _CHUNK)
        except BlockingIOError:  # a writer holds it open and has written nothing yet: wait for it below
            first = None
        if first == b"":  # no writer now, and nothing left by one
            raise ImageError(f"FIFO with no writer: nothing was written to it within {WRITER_WAIT_S:g} s", path)
        os.set_blocking(fd, True)
        data = bytearray(first or b"")
        while chunk := os.read(fd, _CHUNK):
            data += chunk
            if max_bytes is not None and len(data) > max_bytes:
                raise ImageError(f"too large: more than the {max_bytes} bytes an image within the pixel limit "
                                 "can take (--max-pixels x 8 bytes + 64 MiB)", path)
        return data
    except ImageError:
        raise
    except OSError as e:
        raise ImageError(f"unreadable: {e.strerror or e}", path) from e
    finally:
        os.close(fd)
