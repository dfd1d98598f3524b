"""Write files so that a crash or a full disk never leaves a half-written file in place: write a
temporary file in the same folder, flush it to disk, then rename it over the target."""
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write, binary=False):
    """Call write(file) on a temporary file next to `path`, then atomically rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text))
