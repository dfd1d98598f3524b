"""The flat scan (method "flat", exact): every code is compared, with FAISS's IndexBinaryFlat when FAISS is
installed, else NumPy (hashing.evaluation.metrics.rank_top_k).

FAISS is exact and, as checked against its source and by tests/test_search.py, already orders ties by row: it
scans the rows in order, admits a row only when it is strictly closer than the current k-th, and its heap
compares (distance, row) pairs. Rows are kept in id order, so ties by row are ties by id; results are still
re-sorted by (distance, id), a no-op with the FAISS version pinned in requirements.txt. Which tied rows a
FAISS version keeps at the k-th distance no re-sort could repair, so the tests check FAISS alone against
brute force too. hashing/search/exact.py's search() (used by --query) is this method.
"""
import itertools

import numpy as np

from hashing.codes import hamming_distances, word_columns
from hashing.evaluation.metrics import rank_top_k
from hashing.search.backend import (StoredBackend, empty_result, faiss_available, import_faiss, no_matches,
                                    order_by_distance_then_id, register_backend)

# Query rows x database items per chunk of the NumPy scan: bounded memory, as in hashing.evaluation.metrics.
_CHUNK_ELEMENTS = 1 << 20


def faiss_flat_index(bits):
    """A FAISS IndexBinaryFlat holding packed codes, FAISS id = row."""
    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    index = import_faiss().IndexBinaryFlat(bits.shape[1] * 8)
    index.add(bits)
    return index


def ranked_range_result(lims, distances, rows):
    """FAISS range_search output (lims, D, I) as per-query (distances int32, rows int64) in (distance, row)
    order."""
    results = []
    for start, end in itertools.pairwise(lims):
        order = np.lexsort((rows[start:end], distances[start:end]))
        results.append((distances[start:end][order].astype(np.int32), rows[start:end][order].astype(np.int64)))
    return results


def ids_of(ids, rows):
    """The ids of result `rows` (-1 stays -1)."""
    return np.where(rows >= 0, ids[np.maximum(rows, 0)], -1) if len(ids) else rows


@register_backend
class FlatBackend(StoredBackend):
    """Exact scan of every code: FAISS IndexBinaryFlat (use_faiss None = when installed), or NumPy."""

    name = "flat"
    OPTIONS = {"use_faiss": None}

    def __init__(self, hash_bit, **options):
        super().__init__(hash_bit, **options)
        use_faiss = self.options.get("use_faiss")  # "auto" (a subclass) takes no options
        self.use_faiss = faiss_available() if use_faiss is None else bool(use_faiss)
        self.faiss_index = None

    @property
    def nbytes(self):
        return self._store.nbytes + (self._store.codes.nbytes if self.use_faiss else 0)  # FAISS's copy

    def add(self, codes, ids):
        appended = super().add(codes, ids)
        if not self.use_faiss:
            return
        if appended and self.faiss_index is not None:
            self.faiss_index.add(np.ascontiguousarray(self._store.codes[len(self) - len(codes):]))
        else:
            self.faiss_index = faiss_flat_index(self._store.codes)

    def remove(self, ids):
        removed = super().remove(ids)
        if removed and self.use_faiss:
            self.faiss_index = faiss_flat_index(self._store.codes)
        return removed

    def restore(self, codes, ids, arrays):
        if not super().restore(codes, ids, arrays):
            return False  # nothing built: the caller restores again without the arrays
        self.faiss_index = faiss_flat_index(codes) if self.use_faiss else None
        return True

    def _distance_chunks(self, queries):
        """The distances of one chunk of queries after another to every code: bounded memory per chunk."""
        codes = self._store.codes
        query_words, code_words = word_columns(queries), word_columns(codes)
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(len(codes), 1))
        for start in range(0, len(queries), rows_per_chunk):
            yield hamming_distances([w[start:start + rows_per_chunk] for w in query_words], code_words,
                                    codes.shape[1] * 8)  # the padding bits are 0 on both sides

    def search(self, queries, k):
        k = min(int(k), len(self))
        if k == 0 or not len(queries):
            return empty_result(len(queries), k)
        if self.use_faiss:
            distances, rows = self.faiss_index.search(queries, k)
        else:
            distances, rows = [], []
            for dist in self._distance_chunks(queries):
                ranked = rank_top_k(dist, k)
                distances.append(np.take_along_axis(dist, ranked, axis=1))
                rows.append(ranked)
            distances, rows = np.concatenate(distances), np.concatenate(rows)
        # rows are in id order, so (distance, row) order is (distance, id) order; a no-op re-sort as a guard
        distances, rows = order_by_distance_then_id(distances.astype(np.int32), rows.astype(np.int64))
        return distances, ids_of(self._store.ids, rows)

    def search_radius(self, queries, radius):
        radius = min(int(radius), self.hash_bit)
        if not len(self):
            return no_matches(len(queries))
        if self.use_faiss:
            results = ranked_range_result(*self.faiss_index.range_search(queries, radius + 1))  # FAISS: d < r
        else:
            results = []
            for dist in self._distance_chunks(queries):
                for row in dist:
                    inside = np.flatnonzero(row <= radius)
                    order = np.argsort(row[inside], kind="stable")
                    results.append((row[inside][order].astype(np.int32), inside[order].astype(np.int64)))
        return [(distances, ids_of(self._store.ids, rows)) for distances, rows in results]
