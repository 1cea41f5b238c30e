"""The one image reader: which files are images, how they are listed, and how they become RGB.

Every command that reads an image goes through here: `bcc pack` (source files), the shard stream
(stored bytes), folder `bcc eval`, `bcc predict` and its Grad-CAM overlays. One policy for all of them:

* suffixes: `IMAGE_SUFFIXES` (compared in lower case);
* decoding (`decode_rgb`): EXIF orientation applied; 16-bit greyscale scaled by its range to 8 bits
  (the high byte; Pillow's own `convert` would clip everything above 255 to white); any other mode
  converted to 8-bit RGB; the whole image decoded at once, so a truncated file fails here;
* size: images above `MAX_IMAGE_PIXELS` (Pillow's decompression-bomb limit) are refused with a message
  naming the size; Pillow's own check is off so that the limit is exactly this one everywhere;
* listing (`scan_class_folders`, `collect_images`): sorted, hidden entries skipped (pack lists them), symlinked folders
  not followed, a symlinked file read only when its target lies inside the listed root, anything that
  is not a regular file skipped with its reason;
* names (`display_path`): the printable form in which every command stores and prints a file name
  (bytes that are not UTF-8, as in zips made on Windows, become `\\xNN`).
"""

from __future__ import annotations

import array
import contextlib
import io
import math
import operator
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bcc.errors import BccError, Interrupted

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "ImageEntry",
    "ImageError",
    "PathList",
    "collect_images",
    "decode_rgb",
    "display_path",
    "is_image_name",
    "max_file_bytes",
    "open_image",
    "read_file",
    "scan_class_folders",
    "to_rgb",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif",
                  ".ppm", ".pgm", ".pbm", ".jp2", ".j2k")
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS, fixed here for every reader
BYTES_PER_PIXEL = 8  # the deepest image bcc reads, uncompressed: 16-bit RGBA (PNG, TIFF)
FILE_HEADROOM = 64 << 20  # room for what an image file holds besides pixels: EXIF, ICC, XMP, a thumbnail

UNIDENTIFIED = "cannot identify image format"
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageError(BccError, OSError):
    """A file that cannot be read as an image: `reason` (one line), `path` when read from a file."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason, self.path = reason, None if path is None else str(path)
        super().__init__(reason if path is None else f"cannot read image {path}: {reason}")

    @property
    def is_unidentified(self) -> bool:
        """True when the bytes are no image format Pillow knows (as opposed to a damaged image)."""
        return self.reason.startswith(UNIDENTIFIED)


# controls, surrogates (bytes that are not UTF-8), and the invisible format characters that reorder or hide
# text (U+202E RIGHT-TO-LEFT OVERRIDE shows `gpj.exe` as `exe.jpg`; zero-width spaces, line separators)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as `os` gives it (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def display_path(path: str | os.PathLike) -> str:
    """`path` in the printable form bcc stores and prints wherever a file name goes (a sample's `source`,
    the manifest's lists, CSV, JSON, the console): each byte of the name that is not UTF-8 (which `os`
    gives as a lone surrogate, e.g. a Latin-1 or CP437 name from a zip made on Windows) as `\\xNN`, and a
    control character as `\\xNN` (a newline or an escape sequence in a name would break a one-line message),
    an invisible format character (right-to-left override, zero-width space) as `\\uNNNN`;
    everything else unchanged. A surrogate cannot be written as UTF-8: such a name crashed every writer
    of text (`bcc eval`'s CSV). The form is for people and for matching, not for opening the file."""
    path = os.fspath(path)
    if path.isascii() and path.isprintable():  # nearly every name: no regex
        return path
    return _UNPRINTABLE.sub(_escape, path)


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file name ends in one of `IMAGE_SUFFIXES` (any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


# --------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    # the limit is checked by open_image with a clear message, so Pillow's own check (a warning, then an
    # error at twice the limit, depending on a global) is off while we decode
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def max_file_bytes(max_pixels: int | None) -> int | None:
    """The largest file that can hold an image of at most `max_pixels` pixels: `max_pixels` uncompressed
    at `BYTES_PER_PIXEL` (8: 16-bit RGBA, the deepest format bcc reads) plus `FILE_HEADROOM` (64 MiB) of
    metadata; None without a limit. At `MAX_IMAGE_PIXELS`: 782,936,744 bytes (~747 MiB). A larger file
    is refused unread (`bcc pack` skips it: a multi-GB junk file cost twice its size in memory)."""
    return None if not max_pixels else max_pixels * BYTES_PER_PIXEL + FILE_HEADROOM


def read_file(path: str, max_bytes: int | None = None) -> bytes | bytearray:
    """The bytes of the image file at `path` in one buffer, by file descriptor (~5 us a small file, where
    pathlib's `read_bytes()` takes ~15; `bcc pack`'s one read of a source). A file larger than
    `max_bytes` (`max_file_bytes`) is an ImageError "too large: ..." and is not read; OSError as `os`
    raises it. Never two copies: the parts of a 3 GiB junk file
    (Linux reads at most 2 GiB a call) were joined, at 6 GiB of RSS."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        _check_size(size, max_bytes)
        if size < _ONE_READ:
            # bytes of the file's size, in one call: hashlib and Pillow (BytesIO) read them without a copy
            data = os.read(fd, size + 1)
            if len(data) == size and not os.read(fd, 1):
                return data
            del data  # a short read, or a file that changed since the stat: read it again, into one buffer
            os.lseek(fd, 0, os.SEEK_SET)
        return _read_into(fd, size, max_bytes)
    finally:
        os.close(fd)


_ONE_READ = 1 << 30  # a file under 1 GiB comes back whole from one read call (Linux's cap: 2 GiB - 4 KiB)


def _read_into(fd: int, size: int, max_bytes: int | None) -> bytearray:
    """The rest of `fd` read in place into one buffer of `size` bytes (grown only if the file grows)."""
    buf = bytearray(size + 1)  # one byte more: a file that grew shows it
    got = 0
    with memoryview(buf) as view:
        while got < len(buf) and (n := os.readv(fd, [view[got:]])):
            got += n
    if got > size:  # grew since the stat: read on to the end, still under the cap
        while chunk := os.read(fd, 1 << 20):
            buf += chunk
            _check_size(len(buf), max_bytes)
    else:
        del buf[got:]  # the byte more, or what a file cut since the stat lost
    return buf


def _check_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ImageError(f"too large: {size} bytes, more than the {max_bytes} an image within the pixel limit "
                         "can take (--max-pixels x 8 bytes + 64 MiB)")


_BYTES = (bytes, bytearray, memoryview)


def open_image(source: bytes | bytearray | str | os.PathLike, *, max_pixels: int | None = MAX_IMAGE_PIXELS,
               min_side: int | None = None):
    """The fully decoded PIL image of `source` (bytes or a path), in its own mode and orientation.

    With `min_side`, a JPEG may decode at 1/2, 1/4 or 1/8 scale as long as its short side stays at
    least `min_side` (most of the speed-up of a resize). A path that is a pipe is read by
    `bcc.pipe_input.read_pipe` (a FIFO without writer, a device: refused). Raises
    `ImageError` with a one-line reason ("not an image", "corrupt image: ...", "decompression bomb").
    """
    from PIL import Image, UnidentifiedImageError

    path = None if isinstance(source, _BYTES) else source
    if isinstance(source, (str, os.PathLike)):  # a pipe (`<(...)`, a FIFO) read whole, never blocked on unwritten
        from bcc.pipe_input import read_pipe

        piped = read_pipe(source, max_file_bytes(max_pixels))
        source = source if piped is None else piped
    stream = io.BytesIO(source) if isinstance(source, _BYTES) else source
    with _own_pixel_limit():
        try:
            img = Image.open(stream)
        except UnidentifiedImageError as e:
            raise ImageError(UNIDENTIFIED, path) from e
        except OSError as e:
            if e.errno is not None:  # the file itself: missing, permissions, I/O error
                raise ImageError(f"unreadable: {e.strerror or e}", path) from e
            raise ImageError(f"corrupt image: {e}", path) from e
        except Interrupted:  # a signal raised inside the decoder (`bcc.errors.interrupts_raise`): no bad file
            raise
        except Exception as e:  # a decoder bug in a plugin: still one bad file
            raise ImageError(f"corrupt image: {type(e).__name__}: {e}", path) from e
        width, height = img.size
        if max_pixels and width * height > max_pixels:
            img.close()
            raise ImageError(f"decompression bomb: {width * height} pixels > limit {max_pixels}", path)
        scale = min_side / min(width, height) if min_side else 1.0
        if scale < 1:
            img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        try:
            img.load()  # full decode: catches truncated and corrupt data
        except Interrupted:
            img.close()
            raise
        except Exception as e:
            img.close()
            raise ImageError(f"corrupt image: {e}", path) from e
    return img


def to_rgb(img):
    """8-bit RGB of a decoded image: orientation applied, 16-bit grey scaled by its range."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT:
        import numpy as np

        arr = np.asarray(img).astype(np.uint32) >> 8  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode != "RGB":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notice
            img = img.convert("RGB")
    return img


def decode_rgb(source: bytes | str | os.PathLike, *, max_pixels: int | None = MAX_IMAGE_PIXELS):
    """`source` (bytes or a path) as an 8-bit RGB PIL image under the module's policy; `ImageError`
    (an `OSError`) with a one-line reason when it cannot be read."""
    img = open_image(source, max_pixels=max_pixels)
    try:
        return to_rgb(img)
    finally:
        img.close()


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One listed file. Slotted, with the root string shared by every entry and `path` made on demand:
    a million-file listing holds one object and one relative path per file (~140 bytes, not ~290)."""

    rel: str  # relative to the listed root, posix
    folder: str  # top-level class folder ("" for loose files)
    class_index: int  # -1 for loose files
    root: str  # the listed root, absolute (not resolved)

    @property
    def path(self) -> str:
        """Absolute path of the file (root joined with `rel`)."""
        return os.path.join(self.root, self.rel)


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _link_target(link: Path) -> tuple[Path | None, str | None]:
    """(where a symlink leads, None), or (None, a skip reason) for a link that loops."""
    try:
        return link.resolve(), None
    except (OSError, RuntimeError):  # a loop: RuntimeError before Python 3.13, OSError (ELOOP) after
        try:
            to = os.readlink(link)
        except OSError:
            to = "?"
        return None, f"symlink loop: -> {to}"


_LINKED_FOLDER = "symlinked folder not followed"
_HIDDEN = "hidden (its name starts with '.'), not read"  # .DS_Store, .ipynb_checkpoints/, an image someone hid


def _walk(top: Path, root: Path, base: Path) -> Iterator[tuple[str, str, str | None]]:
    """(path, path relative to `base`, skip reason or None) of every file under `top` (a hidden file or
    folder: one entry, skipped with its reason), sorted as a top-down walk (a folder's linked folders, then its files, then its sub-folders), under
    the module's link policy (`root` is what a link target must lie in). File types come from the
    directory listing itself (`os.scandir`'s d_type): no stat per file, only per link (a 200k-file
    listing took 0.8 s of CPU with an lstat per file, 0.2 s without). A folder that cannot be listed
    is reported, not passed over."""
    try:
        with os.scandir(top) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        if top != base:  # the class folder itself is checked by the caller
            yield str(top), top.relative_to(base).as_posix(), f"unreadable folder: {e.strerror or e}"
        return
    inner = top.relative_to(base).as_posix()
    prefix = "" if inner == "." else inner + "/"
    folders, files = [], []
    for entry in entries:
        if entry.name.startswith("."):  # listed, not walked: a hidden image is no silent loss
            yield entry.path, prefix + entry.name, _HIDDEN
            continue
        try:
            is_dir = entry.is_dir()  # a link to a folder counts as a folder, as in os.walk
        except OSError:
            is_dir = False
        (folders if is_dir else files).append(entry)
    subfolders = []
    for entry in folders:
        if entry.is_symlink():
            sub = Path(entry.path)
            target, loop = _link_target(sub)
            inside = target is not None and _is_within(target, root)
            yield entry.path, prefix + entry.name, loop or (_LINKED_FOLDER if inside else f"symlink outside SRC: -> {target}")
        else:
            subfolders.append(Path(entry.path))
    for entry in files:
        path, rel = entry.path, prefix + entry.name
        try:
            if entry.is_symlink():
                target, loop = _link_target(Path(path))
                if loop:
                    yield path, rel, loop
                    continue
                if not target.exists():
                    yield path, rel, f"broken symlink: -> {target}"
                    continue
                if not _is_within(target, root):
                    yield path, rel, f"symlink outside SRC: -> {target}"
                    continue
                regular = stat.S_ISREG(os.stat(path).st_mode)
            else:
                regular = entry.is_file(follow_symlinks=False)
        except OSError as e:
            yield path, rel, f"unreadable: {e.strerror or e}"
            continue
        if not regular:  # a FIFO would block the reader forever
            yield path, rel, "not a regular file"
            continue
        yield path, rel, None
    for sub in subfolders:
        yield from _walk(sub, root, base)


def scan_class_folders(src: str | os.PathLike, resolve_folder: Callable[[str], int]):
    """Files under `src/<class folder>/` -> (entries sorted by `rel`, skipped, warnings).

    `resolve_folder(name)` gives a folder's class index (e.g. `Taxonomy.resolve_folder`, which raises
    `TaxonomyError` for an unknown name); every folder is resolved before any file is listed, so a typo
    fails fast. All regular files are listed, images or not (callers decide); `skipped` holds
    `{"path", "reason"}` for loose files at the top, links not followed and unreadable entries;
    `warnings` names empty class folders.
    """
    skipped: list[dict[str, str]] = []
    warnings_: list[str] = []
    entries = sorted(iter_class_folders(src, resolve_folder, skipped, warnings_), key=lambda e: e.rel)
    return entries, skipped, warnings_


class PathList:
    """Relative paths kept compact, for listings of millions of files: one UTF-8 blob (undecodable
    names round-trip through surrogateescape, as `os` gives them) and an end offset per path, ~30
    bytes a path against ~80 in a list of str (a million-file pack: ~30 MB, not ~80). Indexing
    decodes one path (~0.3 us); `append`, `len`, iteration and `permuted` are what the packer needs."""

    def __init__(self, paths: Iterable[str] = ()):
        self._blob = bytearray()
        self._ends = array.array("q")
        for p in paths:
            self.append(p)

    def append(self, path: str) -> None:
        self._blob += path.encode("utf-8", "surrogateescape")
        self._ends.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        i = operator.index(i)
        if i < 0:
            i += len(self._ends)
        end = self._ends[i]  # IndexError past the end
        start = self._ends[i - 1] if i else 0
        return self._blob[start:end].decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return map(self.__getitem__, range(len(self._ends)))

    def permuted(self, order: Iterable[int]) -> PathList:
        """A new list whose path k is this list's path order[k]."""
        return PathList(map(self.__getitem__, order))


def _skip(skipped: list[dict[str, str]], path: str, reason: str) -> None:
    # names (and link targets in reasons) in their printable form: the manifest and console take them as text
    skipped.append({"path": display_path(path), "reason": display_path(reason)})


def iter_class_folders(src: str | os.PathLike, resolve_folder: Callable[[str], int], skipped: list[dict[str, str]],
                       warnings_: list[str]) -> Iterator[ImageEntry]:
    """`scan_class_folders` as the walk goes: entries in walk order (folder by folder, not sorted by
    `rel`), skips and warnings appended to the lists given. Folders are resolved (TaxonomyError) in
    this call, before the iterator is returned; files are listed as it is consumed."""
    src = Path(src)
    root = src.resolve()
    names: list[str] = []
    for item in sorted(os.scandir(src), key=lambda e: e.name):
        if item.name.startswith("."):
            _skip(skipped, item.name, _HIDDEN)
            continue
        target, loop = _link_target(Path(item.path)) if item.is_symlink() else (None, None)
        if loop:
            _skip(skipped, item.name, loop)
        elif target is not None and not target.exists():
            _skip(skipped, item.name, f"broken symlink: -> {target}")
        elif item.is_dir(follow_symlinks=True):
            names.append(item.name)
        else:
            _skip(skipped, item.name, "not in a class folder")
    folders = [(name, resolve_folder(name)) for name in names]
    return _list_folders(src, root, folders, skipped, warnings_)


def _list_folders(src: Path, root: Path, folders, skipped: list[dict[str, str]],
                  warnings_: list[str]) -> Iterator[ImageEntry]:
    listed = str(src.absolute())
    for name, class_index in folders:
        top = src / name
        if top.is_symlink():
            target, loop = _link_target(top)
            if loop or not _is_within(target, root):
                _skip(skipped, name, loop or f"symlink outside SRC: -> {target}")
                continue
        found = 0
        for _path, rel, reason in _walk(top, root, src):
            found += 1
            if reason:
                _skip(skipped, rel, reason)
            else:
                yield ImageEntry(rel, name, class_index, listed)
        if found == 0:
            warnings_.append(f"class folder {name!r} is empty")


def collect_images(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to read: explicit files as given, directories searched recursively for `IMAGE_SUFFIXES`
    (hidden entries skipped, links as in `scan_class_folders`), sorted, without repeats.

    Returns (files, [(path, problem)]): a missing path, an empty directory and a link not followed are
    problems, named so the caller can report them.
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = []
            root = p.resolve()
            listing = []
            for name, rel, reason in _walk(p, root, p):
                if reason == _LINKED_FOLDER and "/" not in rel:
                    # a class folder linked to a folder inside the listed root: followed, as pack and
                    # folder eval follow one inside SRC (links deeper down are not, there either)
                    listing += _walk(Path(name), root, Path(name))
                else:
                    listing.append((name, rel, reason))
            for name, _rel, reason in listing:
                path = Path(name)
                # skipped non-images are none of ours; a link that leads nowhere might have been a folder
                if reason == _HIDDEN and not is_image_name(path):
                    continue  # a hidden folder or file beside the images: not one the user asked about
                if reason and (is_image_name(path) or path.is_dir() or reason.startswith(("broken", "symlink loop"))):
                    problems.append((str(path), reason))
                elif not reason and is_image_name(path):
                    found.append(path)
            if not found:
                problems.append((str(p), "directory holds no image files (" + " ".join(IMAGE_SUFFIXES) + ")"))
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            problems.append((str(p), "no such file or directory"))
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems

