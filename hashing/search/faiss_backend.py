"""FAISS's approximate binary indexes as search backends (methods "ivf" and "hnsw").

- "ivf": IndexBinaryIVF: the codes are clustered, and a search scans the `nprobe` nearest of `nlist` clusters,
  so it misses neighbours in other clusters.
- "hnsw": IndexBinaryHNSW, a neighbourhood graph walked greedily, so it misses neighbours the walk does not
  reach. FAISS builds the graph on several threads, which makes it depend on thread timing (faiss issue #5387:
  results change under a Hamming isometry); here it is built on one thread, so the same codes give the same
  graph. No radius search.

The FAISS index is built at the first search after a change (an IVF's clusters are trained on the codes held
then, and HNSW has no removal), so change these indexes in batches.
"""
import math
import threading

import numpy as np

from hashing.search.backend import (StoredBackend, empty_result, import_faiss, no_matches, order_by_distance_then_id,
                                    register_backend)
from hashing.search.flat import ids_of, ranked_range_result


class FaissApproximateBackend(StoredBackend):
    """The codes in id order (FAISS id = row) and a FAISS index over them, built when first searched."""

    exact = False

    def __init__(self, hash_bit, **options):
        super().__init__(hash_bit, **options)
        self.index = None
        self._building = threading.Lock()  # concurrent first searches build the index once

    def add(self, codes, ids):
        super().add(codes, ids)
        self.index = None

    def remove(self, ids):
        removed = super().remove(ids)
        if removed:
            self.index = None
        return removed

    def restore(self, codes, ids, arrays):
        if not super().restore(codes, ids, arrays):
            return False
        self.index = None
        return True

    def prepare(self):
        self.built()

    def built(self):
        with self._building:
            if self.index is None and len(self):
                self.index = self.new_index(np.ascontiguousarray(self._store.codes))
            return self.index

    def new_index(self, codes):
        raise NotImplementedError

    @property
    def nbytes(self):
        return self._store.nbytes + (self.index_bytes(self.built()) if len(self) else 0)

    def search(self, queries, k):
        k = min(int(k), len(self))
        if k == 0 or not len(queries):
            return empty_result(len(queries), k)
        distances, rows = self.built().search(queries, k)
        distances[rows < 0] = self.hash_bit + 1
        distances, rows = order_by_distance_then_id(distances.astype(np.int32), rows.astype(np.int64))
        return distances, ids_of(self._store.ids, rows)

    def search_radius(self, queries, radius):
        if not len(self):
            return no_matches(len(queries))
        results = ranked_range_result(*self.built().range_search(queries, min(int(radius), self.hash_bit) + 1))
        return [(distances, ids_of(self._store.ids, rows)) for distances, rows in results]


@register_backend
class IVFBackend(FaissApproximateBackend):
    """FAISS IndexBinaryIVF: nlist (None = sqrt(N); at most N), nprobe, seed (of the training sample and
    k-means)."""

    name = "ivf"
    OPTIONS = {"nlist": None, "nprobe": 16, "seed": 0}

    def new_index(self, codes):
        faiss, options = import_faiss(), self.options
        dimension = codes.shape[1] * 8
        # FAISS's k-means needs at least as many codes as clusters (an index may shrink after it is saved)
        nlist = min(options["nlist"] or max(1, round(math.sqrt(len(codes)))), len(codes))
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dimension), dimension, nlist)
        index.cp.seed = options["seed"]
        sample = np.random.default_rng(options["seed"]).choice(len(codes), min(len(codes), 64 * nlist), replace=False)
        index.train(codes[np.sort(sample)])
        index.add(codes)
        index.nprobe = options["nprobe"]
        return index

    @staticmethod
    def index_bytes(index):
        return index.ntotal * (index.code_size + 8) + index.nlist * index.code_size


@register_backend
class HNSWBackend(FaissApproximateBackend):
    """FAISS IndexBinaryHNSW: neighbors (FAISS's M), ef_construction, ef_search; built on one thread."""

    name = "hnsw"
    OPTIONS = {"neighbors": 16, "ef_construction": 40, "ef_search": 128}

    def new_index(self, codes):
        faiss, options = import_faiss(), self.options
        index = faiss.IndexBinaryHNSW(codes.shape[1] * 8, options["neighbors"])
        index.hnsw.efConstruction = options["ef_construction"]
        index.hnsw.efSearch = options["ef_search"]
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # one thread: the graph does not depend on thread timing (faiss #5387)
        try:
            index.add(codes)
        finally:
            faiss.omp_set_num_threads(threads)
        return index

    @staticmethod
    def index_bytes(index):
        hnsw = index.hnsw
        return index.ntotal * index.code_size + 4 * (hnsw.neighbors.size() + hnsw.levels.size()) + \
            8 * hnsw.offsets.size()

    def search_radius(self, queries, radius):
        raise ValueError("method 'hnsw' has no radius search (FAISS has none for binary HNSW); "
                         "use method 'mih' or 'flat'")
