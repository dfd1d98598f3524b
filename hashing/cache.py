"""The codes cache: the packed codes of a checkpoint, stored as OUTPUT_DIR/{run}.codes.npz, so that
evaluating or searching with the same checkpoint again needs no network pass.

The file holds a CodeSet (hashing/codes.py: packed sign bits and packed labels, 6 bytes a code at 48
bits, ~40x less than the JSON text the paper's code caches) and the key it was computed under: the
SHA-256 of the checkpoint's bytes and everything else the codes depend on (the caller's settings: the
data flags, the input size, a digest of each split's labels and images). A cache whose key differs
from the current run's is ignored and rewritten, so a retrained checkpoint or an edited split file
never reuses stale codes. The metrics are recomputed from the codes every time, so evaluation
options (K, top-N) need not be in the key.

Codes computed on another device may differ in the sign of outputs within floating-point
rounding of 0; the cache does not try to detect that.
"""
import hashlib
import json

import numpy as np

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.documents import parse_json
from utils.paths import GiB, MiB, check_output_target, load_arrays

from hashing.codes import CodeSet

# Bump when the file layout or the meaning of the stored codes changes: older files are then re-encoded.
FORMAT_VERSION = 3
# The most a codes file may hold (unpacked): 100x the packed codes and labels of NUS-WIDE's 193,734-item
# database at 1,024 bits; a crafted or damaged file declaring more is not read.
MAX_CODES_BYTES = 8 * GiB
MAX_KEY_BYTES = 4 * MiB  # the key is a few hundred characters (stored as UTF-32)


def file_sha256(path):
    """Hex SHA-256 of a file's bytes, or None when there is no such file."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def cache_key(checkpoint, settings):
    """What the codes depend on, as a dict: the checkpoint's SHA-256 and `settings` (JSON values); None
    when the checkpoint does not exist."""
    checkpoint_sha256 = file_sha256(checkpoint)
    if checkpoint_sha256 is None:
        return None
    return {"format": FORMAT_VERSION, "checkpoint_sha256": checkpoint_sha256, **settings}


def save(path, codes, key):
    """Write the codes and the key they were computed under, atomically; UserError when `path` is a device,
    a FIFO or a folder (writing would replace it)."""
    check_output_target(path, "the codes cache")
    atomic_write(path, lambda handle: np.savez(handle, key=np.array(json.dumps(key, sort_keys=True)),
                                               **codes.stored_arrays()), binary=True)


def read(path):
    """(CodeSet, key) stored at `path`; None when it is missing or unusable: not a regular file, declaring more
    than it holds or than MAX_CODES_BYTES, not a well-formed CodeSet (utils/paths.load_arrays,
    CodeSet.from_stored), or with a damaged key (utils/documents.parse_json): the codes are then encoded again.
    Read without unpickling, so a replaced file cannot run code."""
    try:
        arrays = load_arrays(path, "the codes cache", MAX_CODES_BYTES)
        key = arrays["key"]
        if key.shape != () or key.dtype.kind != "U" or key.nbytes > MAX_KEY_BYTES:
            return None
        return CodeSet.from_stored(arrays), parse_json(str(key), f"the key of the codes cache {path}")
    except (UserError, KeyError, ValueError):
        return None


def load(path, key):
    """The CodeSet cached at `path` if it was computed under `key`, else None (missing, stale or unreadable)."""
    stored = read(path) if key is not None else None
    return stored[0] if stored is not None and stored[1] == key else None
