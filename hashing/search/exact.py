"""Exact Hamming search of packed binary codes as one function call, and the FAISS index export.

search() is the "flat" search backend (hashing/search/flat.py: FAISS IndexBinaryFlat when installed, else
NumPy): the k nearest database items of each query, ordered by Hamming distance and then by database index
(the ranking rule of hashing/evaluation/metrics.py). `--query` uses it; hashing/search/flat.py holds the one
ranking implementation and says why FAISS's ties come out by index. To search a database more than once, or one too large to scan,
build a hashing.search.index.HammingIndex.

FAISS needs a whole number of bytes, so an exported index of n-bit codes has ceil(n / 8) * 8 dimensions;
the padding bits are 0 in every code and add no distance.
"""
import numpy as np

from utils.atomic import atomic_write
from utils.paths import open_regular

from hashing.search.backend import faiss_available, import_faiss
from hashing.search.flat import faiss_flat_index
from hashing.search.index import HammingIndex

build_index = faiss_flat_index  # the name tests and callers know
BINARY_FLAT_MAGIC = b"IBxF"  # the first bytes of FAISS's serialised IndexBinaryFlat
# The most results a person asks for per query (--num_matches, the search server's k and its page): a ranking
# printed or shown, not a bulk export (HammingIndex.search takes any k).
MAX_K = 1000

__all__ = ["build_index", "faiss_available", "search", "write_index"]


def is_binary_index(path):
    """Whether `path` is a regular file that begins as a FAISS IndexBinaryFlat does: how --export_index
    recognises its earlier output, the one kind of existing file it replaces."""
    with open_regular(path, "index") as handle:
        return handle.read(len(BINARY_FLAT_MAGIC)) == BINARY_FLAT_MAGIC


def write_index(database_bits, path):
    """Write the database's IndexBinaryFlat to `path` atomically; faiss.read_index_binary reads it back."""
    serialized = import_faiss().serialize_index_binary(faiss_flat_index(database_bits))
    atomic_write(path, lambda handle: handle.write(serialized.tobytes()), binary=True)  # UserError if it fails


def search(query_bits, database_bits, k, use_faiss=None):
    """(distances, indices), int32 and int64 arrays of shape (Q, min(k, N)): the nearest database items of
    each packed query code, ties by database index. use_faiss: None = when installed."""
    query_bits = np.ascontiguousarray(query_bits, dtype=np.uint8)
    database_bits = np.ascontiguousarray(database_bits, dtype=np.uint8)
    if query_bits.shape[1] != database_bits.shape[1]:
        raise ValueError(f"query codes have {query_bits.shape[1]} bytes but database codes {database_bits.shape[1]}")
    if min(int(k), len(database_bits)) < 1:
        raise ValueError("search needs k >= 1 and a non-empty database")
    index = HammingIndex.build(database_bits, method="flat", use_faiss=use_faiss)
    return index.search(query_bits, int(k))
