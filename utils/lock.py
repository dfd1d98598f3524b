"""One process at a time per run: an advisory lock on OUTPUT_DIR/{run}.lock, so that two invocations
writing the same run's files (checkpoint, training state, codes, metrics, logs) cannot interleave them.

The lock is fcntl.flock on an open file: the kernel releases it when the process ends, even after
kill -9, so a stale lock file never blocks a later run. The file names the holder (pid and command)
for the message of a run that finds it taken. Where fcntl does not exist (Windows) runs are not locked.
"""
import contextlib
import errno
import os
import sys
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _open_without_following(path):
    """A descriptor of the lock file, created if need be: a symbolic link put in its place is not followed (taking
    the lock truncates the file, which would empty the file the link points to)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)


def _acquire(path):
    """The open lock file at `path`, flock-ed; None when another process holds it."""
    while True:
        handle = open(_open_without_following(path), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        try:  # the holder before us may have removed the file after we opened it: lock the current file
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def _holder(path):
    try:
        return Path(path).read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def run_lock(path, enabled=True, elsewhere="--output_dir"):
    """Hold the lock at `path` for the duration of the block; UserError at once if another process holds it
    (suggesting another `elsewhere`, the flag that moves the output). The file is removed when the block ends
    (a process killed with -9 leaves an unheld file, reused later)."""
    if not enabled or fcntl is None:
        yield
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _acquire(path)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    if handle is None:
        raise UserError(f"{path} is held by {_holder(path)}, which is writing this run's files; wait for it to "
                        f"finish, or use another {elsewhere}")
    with handle:
        try:
            handle.truncate(0)
            handle.write(f"process {os.getpid()} ({' '.join(sys.argv)[:200]})\n")
            handle.flush()
        except OSError as exc:  # a full disk: the lock is held, only its note of the holder is missing
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # closing flushes the unwritten note again, failing again
                handle.close()
            raise _cannot_write(path, exc) from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still holding the lock, so no one else has it yet


def _cannot_write(path, exc):
    if exc.errno == errno.ELOOP:
        return UserError(f"the run lock {path} is a symbolic link, which is never followed (opening the lock empties "
                         "it); delete it or choose another --output_dir")
    return UserError(f"cannot write the run lock {path} ({exc.strerror or exc}); free disk space or choose another "
                     "--output_dir")
