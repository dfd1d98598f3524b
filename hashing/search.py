"""Exact Hamming search of packed binary codes: the k nearest database items of each query, ordered by
Hamming distance and then by database index (the ranking rule of hashing/metrics.py).

FAISS's IndexBinaryFlat is used when faiss is installed. It is exact and, as checked against its source
and by tests/test_search.py, already orders ties by database index: it scans the database in index
order, admits a new item only when it is strictly closer than the current k-th, and its heap compares
(distance, index) pairs. Search still re-sorts each result row by (distance, index), a no-op with the
FAISS version pinned in requirements.txt. Which tied items a FAISS version keeps at the k-th distance
no re-sort can repair, so tests/test_search.py checks FAISS alone against brute force too. Without
faiss, the same ranking comes from hashing.metrics (popcount and radix sort).

Codes are the packed rows of hashing/codes.py, the bytes FAISS takes. FAISS needs a whole number of
bytes, so an index of n-bit codes has ceil(n / 8) * 8 dimensions; the padding bits are 0 in every code
and add no distance.
"""
import importlib.util

import numpy as np

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.paths import open_regular

from .codes import hamming_distances, word_columns
from .metrics import rank_top_k

# Query rows x database items per chunk of the numpy search: bounded memory, as in hashing.metrics.
_CHUNK_ELEMENTS = 1 << 20
BINARY_FLAT_MAGIC = b"IBxF"  # the first bytes of FAISS's serialised IndexBinaryFlat


def faiss_available():
    return importlib.util.find_spec("faiss") is not None


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("this needs FAISS: pip install faiss-cpu (see requirements.txt)") from None
    return faiss


def build_index(database_bits):
    """A FAISS IndexBinaryFlat holding the packed database codes, database index = FAISS id."""
    faiss = _faiss()
    database_bits = np.ascontiguousarray(database_bits, dtype=np.uint8)
    index = faiss.IndexBinaryFlat(database_bits.shape[1] * 8)
    index.add(database_bits)
    return index


def is_binary_index(path):
    """Whether `path` is a regular file that begins as a FAISS IndexBinaryFlat does: how --export_index
    recognises its earlier output, the one kind of existing file it replaces."""
    with open_regular(path, "index") as handle:
        return handle.read(len(BINARY_FLAT_MAGIC)) == BINARY_FLAT_MAGIC


def write_index(database_bits, path):
    """Write the database's IndexBinaryFlat to `path` atomically; faiss.read_index_binary reads it back."""
    serialized = _faiss().serialize_index_binary(build_index(database_bits))
    atomic_write(path, lambda handle: handle.write(serialized.tobytes()), binary=True)  # UserError if it fails


def _order_by_distance_then_index(distances, indices):
    order = np.lexsort((indices, distances), axis=-1)
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(indices, order, axis=1)


def _numpy_search(query_bits, database_bits, k):
    hash_bit = database_bits.shape[1] * 8  # the padding bits are 0 on both sides
    query_words, database_words = word_columns(query_bits), word_columns(database_bits)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // len(database_bits))
    distances, indices = [], []
    for start in range(0, len(query_bits), rows_per_chunk):
        dist = hamming_distances([w[start:start + rows_per_chunk] for w in query_words], database_words, hash_bit)
        ranked = rank_top_k(dist, k)
        distances.append(np.take_along_axis(dist, ranked, axis=1).astype(np.int32))
        indices.append(ranked.astype(np.int64))
    return np.concatenate(distances), np.concatenate(indices)


def search(query_bits, database_bits, k, index=None, use_faiss=None):
    """(distances, indices), both (Q, min(k, N)): the nearest database items of each packed query code.

    index: a prebuilt IndexBinaryFlat of database_bits (built here when None and FAISS is used).
    use_faiss: None = when installed.
    """
    query_bits = np.ascontiguousarray(query_bits, dtype=np.uint8)
    database_bits = np.ascontiguousarray(database_bits, dtype=np.uint8)
    if query_bits.shape[1] != database_bits.shape[1]:
        raise ValueError(f"query codes have {query_bits.shape[1]} bytes but database codes {database_bits.shape[1]}")
    k = min(int(k), len(database_bits))
    if k < 1:
        raise ValueError("search needs k >= 1 and a non-empty database")
    if use_faiss is None:
        use_faiss = faiss_available()
    if not use_faiss:
        return _numpy_search(query_bits, database_bits, k)
    index = index if index is not None else build_index(database_bits)
    distances, indices = index.search(query_bits, k)
    return _order_by_distance_then_index(distances, indices)
