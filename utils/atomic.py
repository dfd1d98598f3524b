"""Write files so that a crash or a full disk never leaves a half-written file in place: write a
temporary file in the same folder, flush it to disk, then rename it over the target."""
import glob
import json
import os
import tempfile
from pathlib import Path

from .errors import UserError
from .paths import check_output_target


def _default_file_mode():
    """What open() would give a new file: 0o666 minus the umask (mkstemp would give 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def atomic_write(path, write, binary=False):
    """Call write(file) on a temporary file next to `path`, then atomically rename it to `path`.

    The target must be absent or a regular file: the rename would replace a FIFO or a device node (utils/paths,
    the writer rule; callers check their inputs themselves). An OSError (disk full, permission denied) becomes a
    UserError; the previous file is untouched.
    """
    path = check_output_target(path, "output file")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path} ({exc.strerror or exc}); {kept}. "
                        "Free disk space or choose another --output_dir") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def remove_leftovers(path):
    """Delete the temporary files atomic_write left next to `path` when its process was killed (kill -9
    skips the cleanup); returns how many. Call it only while no other process writes `path`."""
    path = Path(path)
    leftovers = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return len(leftovers)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text))


def ensure_writable_dir(path, flag="--output_dir"):
    """Create `path` if needed and check that files can be created in it, before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path} is not a writable folder ({exc.strerror or exc}); "
                        f"pass a {flag} you can write to") from None
