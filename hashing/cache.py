"""The codes cache: the packed codes of a checkpoint, stored as OUTPUT_DIR/{run}.codes.npz, so that
evaluating or searching with the same checkpoint again needs no network pass.

The file holds a CodeSet (hashing/codes.py: packed sign bits and packed labels, 6 bytes a code at 48
bits, ~40x less than the JSON text the paper's code caches) and the key it was computed under: the
SHA-256 of the checkpoint's bytes and the flags that change the data or its reading. A cache whose key
differs from the current run's is ignored and rewritten, so a retrained checkpoint never reuses stale
codes. Codes computed on another device may differ in the sign of outputs within floating-point
rounding of 0; the cache does not try to detect that.
"""
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from utils.atomic import atomic_write

from .codes import CodeSet

# Bump when the file layout or the meaning of the stored codes changes: older files are then re-encoded.
FORMAT_VERSION = 2


def file_sha256(path):
    """Hex SHA-256 of a file's bytes, or None when there is no such file."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def cache_key(checkpoint, dataset, backbone, hash_bit, seed, subset, data_root, *, split="paper", **reading):
    """What the codes depend on, as a dict; None when the checkpoint does not exist. (A cache written
    before --split existed has no "split" and is re-encoded once: its Flickr codes were of a seeded split.)
    `reading`: further settings that change the codes of one checkpoint (a multi-head network's inference
    head); only those given enter the key, so the keys of plain runs stay as they were."""
    checkpoint_sha256 = file_sha256(checkpoint)
    if checkpoint_sha256 is None:
        return None
    return {"format": FORMAT_VERSION, "checkpoint_sha256": checkpoint_sha256, "dataset": dataset,
            "backbone": backbone, "hash_bit": int(hash_bit), "seed": int(seed), "subset": int(subset),
            "data_root": str(Path(data_root).resolve()), "split": split, **reading}


def save(path, codes, key):
    """Write the codes and the key they were computed under, atomically."""
    def write(handle):
        np.savez(handle, key=np.array(json.dumps(key, sort_keys=True)), hash_bit=np.array(codes.hash_bit),
                 num_classes=np.array(codes.num_classes), query_bits=codes.query_bits,
                 database_bits=codes.database_bits, query_labels=codes.query_labels,
                 database_labels=codes.database_labels)
    atomic_write(path, write, binary=True)


def load(path, key):
    """The CodeSet cached at `path` if it was computed under `key`, else None (missing, stale or unreadable)."""
    if key is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if json.loads(str(stored["key"])) != key:
                return None
            return CodeSet(query_bits=stored["query_bits"], query_labels=stored["query_labels"],
                           database_bits=stored["database_bits"], database_labels=stored["database_labels"],
                           hash_bit=int(stored["hash_bit"]), num_classes=int(stored["num_classes"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
