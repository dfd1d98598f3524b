"""The two rules every reader and writer of the project follows (README, Threat model).

- A reader takes regular files only: a FIFO would block forever, a device (/dev/zero) would be read
  without bound, a folder cannot be read. It checks the file's size against a cap before reading, and
  a decompressor caps what it inflates (read_capped).
- A writer's target is absent or a regular file, and none of the invocation's inputs: writing over a
  device node would replace it (as root that damages the system), writing over an input loses it.

Both raise UserError with the flag or file named and what to do. open_regular, read_text_file and
load_arrays apply the reader rule to the usual kinds of file (text, .npy/.npz arrays), the latter checking
each array's declared shape against the bytes that hold it before anything is allocated.
"""
import math
import os
import stat
import zipfile
from pathlib import Path

import numpy as np

from .errors import UserError

MiB = 1024 ** 2
GiB = 1024 ** 3


def file_kind(mode):
    """What a stat mode is, in words, for messages ("a FIFO", "a folder", ...)."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def require_regular_file(path, what, max_bytes=None, missing="check the path"):
    """`path` as a Path after checking that it names an existing regular file (symbolic links followed)
    of at most `max_bytes`; UserError naming `what` (a flag or a kind of file) otherwise."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist: {missing}") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(status.st_mode):
        raise UserError(f"{what} {path} is {file_kind(status.st_mode)}, not a regular file: pass a file")
    if max_bytes is not None and status.st_size > max_bytes:
        raise UserError(f"{what} {path} is {status.st_size / MiB:.1f} MiB, more than the {max_bytes / MiB:.1f} MiB "
                        "such a file can sensibly hold: is it the right file?")
    return path


def open_regular(path, what, max_bytes=None, missing="check the path", follow_symlinks=True, writable=False):
    """A binary file object of `path` (read-only, or read-write with writable=True), refused (UserError) unless
    it is a regular file of at most `max_bytes` (and, with follow_symlinks=False, not a symbolic link). The check
    is made on the opened descriptor (opened without blocking, so a FIFO does not hang the open), so the file
    that is read is the file that was checked."""
    path = Path(path)
    access = os.O_RDWR if writable else os.O_RDONLY
    try:
        descriptor = os.open(path, access | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist: {missing}") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise UserError(f"{what} {path} is {file_kind(status.st_mode)}, not a regular file: pass a file")
        if max_bytes is not None and status.st_size > max_bytes:
            raise UserError(f"{what} {path} is {status.st_size / MiB:.1f} MiB, more than the {max_bytes / MiB:.1f} "
                            "MiB such a file can sensibly hold: is it the right file?")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "r+b" if writable else "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_file_bytes(path, what, max_bytes, missing="check the path", follow_symlinks=True):
    """The bytes of a regular file of at most `max_bytes` (open_regular); UserError naming `what` otherwise."""
    with open_regular(path, what, max_bytes, missing, follow_symlinks) as handle:
        try:
            return read_capped(handle, max_bytes, f"{what} {path}")
        except OSError as exc:
            raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None


def read_text_file(path, what, max_bytes, missing="check the path", encoding="utf-8-sig"):
    """The text of a regular file of at most `max_bytes` (open_regular), decoded (utf-8-sig drops the BOM of
    Windows editors); UserError naming `what` when it is missing, not a regular file, too large or not text."""
    data = read_file_bytes(path, what, max_bytes, missing)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 text (line {line} holds the byte {data[exc.start]:#04x}); "
                        "save it as UTF-8") from None


def read_capped(handle, max_bytes, what):
    """All bytes (or text) of an open file or decompressing stream, refusing more than `max_bytes`
    (a gzip bomb inflates a few kB into gigabytes)."""
    data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{what} holds more than {max_bytes / MiB:.1f} MiB (decompressed): it is not a file of this "
                        "project; restore it (git checkout, or the original download)")
    return data


def same_file(a, b):
    """Whether two paths name the same file (resolved paths, or the same inode for hard links)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_target(path, what, inputs=(), earlier_output=None):
    """Refuse (UserError) to write `path` unless it is absent or a regular file that is none of
    `inputs` ([(what, path)], the invocation's inputs). With `earlier_output` = (description, test), an
    existing file is replaced only when test(path) says it is such an earlier output (so a mistyped path
    cannot destroy a file of another kind, an image or a split list). Returns `path` as a Path."""
    path = Path(path)
    try:
        status = path.stat()
    except (FileNotFoundError, NotADirectoryError):  # its folder is checked where it is created
        status = None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be checked ({exc.strerror or exc}); choose another path") from None
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise UserError(f"{what} {path} is {file_kind(status.st_mode)}: writing there would replace it; "
                        "choose a file path")
    for input_what, input_path in inputs:
        if input_path and same_file(path, input_path):
            raise UserError(f"{what} {path} is also {input_what}: writing it would destroy that file; "
                            "choose another path")
    if status is not None and earlier_output is not None:
        description, is_earlier = earlier_output
        try:
            earlier = is_earlier(path)
        except (UserError, OSError, ValueError):
            earlier = False
        if not earlier:
            raise UserError(f"{what} {path} exists and is not {description}: writing it would destroy it; "
                            "choose another path (or delete the file first)")
    return path


def starts_with_line(path, line, max_bytes=64 * MiB):
    """Whether the text file at `path` begins with `line` (a CSV header): how a writer recognises its earlier output."""
    try:
        return read_text_file(path, "file", max_bytes).partition("\n")[0].rstrip("\r") == line
    except UserError:
        return False


# ============ .npy / .npz arrays ============

def _npy_header(handle, what):
    """(shape, fortran order, dtype, header length) of the .npy stream at `handle`, read without reading the data."""
    start = handle.tell()
    try:
        version = np.lib.format.read_magic(handle)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported here")
        shape, fortran_order, dtype = reader(handle)
    except (ValueError, EOFError, OSError, SyntaxError) as exc:
        raise UserError(f"{what} is not a readable .npy array ({exc})") from None
    if dtype.hasobject:
        raise UserError(f"{what} holds Python objects (a pickle), which are never loaded: save plain numbers")
    return shape, fortran_order, dtype, handle.tell() - start


def open_npy_memmap(path, what, dtype, shape, mode="r", fix="delete it"):
    """A .npy file as a memory map (mode "r" or "r+"), after checking that it is a regular file (a symbolic
    link not followed) whose header declares a C-ordered `dtype` array of `shape` that its bytes hold exactly:
    nothing is mapped before the size is known to fit. The checked descriptor is the one mapped. UserError naming
    `what`, the file and `fix` otherwise."""
    with open_regular(path, what, missing=fix, follow_symlinks=False, writable=mode == "r+") as handle:
        size = os.fstat(handle.fileno()).st_size
        found_shape, fortran_order, found_dtype, header = _npy_header(handle, f"{what} {path}")
        dtype, shape = np.dtype(dtype), tuple(shape)
        if found_dtype != dtype or fortran_order or found_shape != shape:
            raise UserError(f"{what} {path} holds a {found_dtype} array of shape {found_shape}, not the {dtype} "
                            f"array of shape {shape} its header records: it is damaged; {fix}")
        needed = header + math.prod(shape) * dtype.itemsize
        if size != needed:
            raise UserError(f"{what} {path} has {size:,} bytes, not the {needed:,} its {dtype} array of shape "
                            f"{shape} takes: it is truncated or damaged; {fix}")
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(handle, dtype=dtype, mode=mode, offset=header, shape=shape)


def _check_declared(shape, dtype, available, what):
    """Refuse an array whose shape and dtype need more bytes than the `available` bytes hold."""
    needed = math.prod(shape) * dtype.itemsize
    if needed > available:
        raise UserError(f"{what} declares a {dtype} array of shape {shape} ({needed:,} bytes) but holds only "
                        f"{available:,} bytes: the file is truncated or crafted")


def load_arrays(path, what, max_bytes):
    """The arrays of a .npy file (as {"": array}) or of a .npz archive ({name: array}), read without unpickling.

    The reader rule for arrays: a regular file (open_regular) of at most `max_bytes`; every array's declared
    shape checked against the bytes that hold it (a 200-byte file may declare 10^12 elements), and a .npz
    member's declared size against `max_bytes` in total before it is inflated (zipfile never inflates past
    a member's declared size). UserError naming `what` otherwise."""
    with open_regular(path, what, max_bytes, missing="check the path") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            if not zipfile.is_zipfile(handle):
                handle.seek(0)
                shape, _, dtype, header = _npy_header(handle, f"{what} {path}")
                _check_declared(shape, dtype, size - header, f"{what} {path}")
                handle.seek(0)
                return {"": np.load(handle, allow_pickle=False)}
            return _load_npz(handle, f"{what} {path}", max_bytes)
        except MemoryError:
            raise UserError(f"{what} {path} does not fit in memory") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(f"{what} {path} is not a readable .npy/.npz array ({exc})") from None


def _load_npz(handle, what, max_bytes):
    handle.seek(0)
    with zipfile.ZipFile(handle) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        declared = sum(info.file_size for info in members)
        if declared > max_bytes:
            raise UserError(f"{what} unpacks to {declared / MiB:.1f} MiB, more than the {max_bytes / MiB:.1f} MiB "
                            "such a file can sensibly hold: is it the right file?")
        arrays = {}
        for info in members:
            name = info.filename.removesuffix(".npy")
            with archive.open(info) as member:
                shape, _, dtype, header = _npy_header(member, f"{what}, array {name!r},")
                _check_declared(shape, dtype, info.file_size - header, f"{what}, array {name!r},")
            with archive.open(info) as member:
                arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
        return arrays
