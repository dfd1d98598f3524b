"""The binary codes of a checkpoint, stored as result/{run}.codes.npz so that evaluating or searching
with the same checkpoint again needs no network pass.

Codes are stored as packed sign bits (np.packbits, big-endian bit order, bit set for x >= 0, padded with
zero bits to whole bytes): 48 bits take 6 bytes, ~40x less than the JSON text of the paper's code. Labels
are packed the same way. The file also records what produced the codes: the SHA-256 of the checkpoint's
bytes and the flags that change the data or its reading (dataset, backbone, hash bits, seed, subset, data
root). A cache whose record differs from the current run is ignored and rewritten, so a retrained
checkpoint never reuses stale codes. Codes computed on another device may differ in the sign of outputs
within floating-point rounding of 0; the cache does not try to detect that.
"""
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write

# Bump when the file layout or the meaning of the stored codes changes.
FORMAT_VERSION = 1


def pack_sign_bits(codes):
    """Real-valued (N, n) codes -> (N, ceil(n / 8)) uint8 packed bits of their signs (0 counts as +)."""
    return np.packbits(np.asarray(codes) >= 0, axis=1)


def unpack_sign_codes(packed, num_bits):
    """Packed bits -> (N, n) int8 codes in {-1, +1}, the inverse of pack_sign_bits up to the sign."""
    bits = np.unpackbits(packed, axis=1, count=num_bits)
    return bits.astype(np.int8) * 2 - 1


@dataclass
class CodeSet:
    """Packed codes and multi-hot labels of the query set and the database."""
    query_bits: np.ndarray
    query_labels: np.ndarray
    database_bits: np.ndarray
    database_labels: np.ndarray
    num_bits: int

    @classmethod
    def from_outputs(cls, query_codes, query_labels, database_codes, database_labels):
        """From the network's real-valued outputs and the label tensors or arrays."""
        query_codes, database_codes = np.asarray(query_codes), np.asarray(database_codes)
        return cls(pack_sign_bits(query_codes), np.asarray(query_labels) > 0,
                   pack_sign_bits(database_codes), np.asarray(database_labels) > 0, query_codes.shape[1])

    def query_codes(self):
        return unpack_sign_codes(self.query_bits, self.num_bits)

    def database_codes(self):
        return unpack_sign_codes(self.database_bits, self.num_bits)


def file_sha256(path):
    """Hex SHA-256 of a file's bytes, or None when there is no such file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def cache_key(checkpoint, dataset, backbone, hash_bit, seed, subset, data_root):
    """What the codes depend on, as a dict; None when the checkpoint does not exist."""
    checkpoint_sha256 = file_sha256(checkpoint)
    if checkpoint_sha256 is None:
        return None
    return {"format": FORMAT_VERSION, "checkpoint_sha256": checkpoint_sha256, "dataset": dataset,
            "backbone": backbone, "hash_bit": int(hash_bit), "seed": int(seed), "subset": int(subset),
            "data_root": str(Path(data_root).resolve())}


def save(path, codes, key):
    """Write the codes and the key they were computed under, atomically."""
    def write(handle):
        np.savez(handle, key=np.array(json.dumps(key, sort_keys=True)), num_bits=np.array(codes.num_bits),
                 query_bits=codes.query_bits, database_bits=codes.database_bits,
                 num_classes=np.array(codes.query_labels.shape[1]),
                 query_labels=np.packbits(codes.query_labels, axis=1),
                 database_labels=np.packbits(codes.database_labels, axis=1))
    atomic_write(path, write, binary=True)


def load(path, key):
    """The CodeSet cached at `path` if it was computed under `key`, else None (missing, stale or unreadable)."""
    if key is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if json.loads(str(stored["key"])) != key:
                return None
            num_classes = int(stored["num_classes"])
            return CodeSet(
                query_bits=stored["query_bits"],
                query_labels=np.unpackbits(stored["query_labels"], axis=1, count=num_classes).astype(bool),
                database_bits=stored["database_bits"],
                database_labels=np.unpackbits(stored["database_labels"], axis=1, count=num_classes).astype(bool),
                num_bits=int(stored["num_bits"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
