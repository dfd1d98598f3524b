"""The two rules every reader and writer of the project follows (README, Threat model).

- A reader takes regular files only: a FIFO would block forever, a device (/dev/zero) would be read
  without bound, a folder cannot be read. It checks the file's size against a cap before reading, and
  a decompressor caps what it inflates (read_capped).
- A writer's target is absent or a regular file, and none of the invocation's inputs: writing over a
  device node would replace it (as root that damages the system), writing over an input loses it.

Both raise UserError with the flag or file named and what to do.
"""
import os
import stat
from pathlib import Path

from .errors import UserError

MiB = 1024 ** 2


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


def check_output_target(path, what, inputs=()):
    """Refuse (UserError) to write `path` unless it is absent or a regular file that is none of
    `inputs` ([(what, path)], the invocation's inputs). Returns `path` as a Path."""
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
    return path
