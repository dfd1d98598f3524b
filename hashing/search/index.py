"""A Hamming index over packed binary codes with integer ids: build it, add and remove ids, save and load it,
and search it for the k nearest codes or for every code within a Hamming radius.

HammingIndex is the public entry over one search backend (hashing/search/backend.py, the interface every
method implements): it checks what it is given (codes, ids, k, radius, options) and keeps the file format;
the backend holds the codes and searches them.

Order. Results come in the evaluator's order (docs/METHOD.md §3.2): ascending Hamming distance, ties by id
ascending. With ids = database indices (the default) that is the ranking mAP scores and `--query` prints.

Methods (`method=`; docs/SEARCH.md has where each wins):

- "flat" (exact, hashing/search/flat.py): every code is compared, FAISS's IndexBinaryFlat when installed,
  else NumPy. hashing/search/exact.py's search() (used by --query) is this method: one ranking.
- "mih" (exact, hashing/search/mih.py): multi-index hashing, which visits only the codes that can be among the
  result; identical results to "flat" to the last tie.
- "auto" (exact, the default; hashing/search/auto.py): per search "flat" or "mih", whichever a cost model
  fitted by benchmarks/fit_search_cost.py predicts faster for N, the code length, the substring count and k
  (or the radius).
- "ivf", "hnsw" (approximate, hashing/search/faiss_backend.py): FAISS's IndexBinaryIVF and IndexBinaryHNSW.
  A query for which they found fewer than k codes gets id -1 at distance hash_bit + 1 in the missing places.

Changes. add() and remove() copy the arrays once (O(N)); multi-index tables are changed in place, FAISS's
approximate indexes rebuilt at the next search; so change an index in batches. Several threads may search an
index at once, but none may change it while another searches it.

File. save() writes the codes, the ids and the backend's search structure (multi-index tables), load() reads
them back after checking them (hashing/search/index_file.py has the format); a structure that does not fit the
codes, or another method asked for at load, is rebuilt from the codes.
"""
import numpy as np

from utils.errors import UserError

from hashing.search.backend import faiss_available, import_faiss, numba_available, open_backend
from hashing.search.flat import faiss_flat_index
from hashing.search.index_file import ALIGNMENT, MAGIC, is_index_file, read_index_file, write_index_file
from hashing.search.options import (DEFAULT_METHOD, MAX_HASH_BIT, METHODS, OPTION_BOUNDS, OptionError, is_exact,
                                    option_problem)

__all__ = ["ALIGNMENT", "DEFAULT_METHOD", "HammingIndex", "MAGIC", "METHODS", "OPTION_BOUNDS", "OptionError",
           "faiss_available", "faiss_flat_index", "import_faiss", "is_index_file", "numba_available"]


class HammingIndex:
    """Packed binary codes (hashing/codes.py: uint8 rows of ceil(hash_bit / 8) bytes) with int64 ids >= 0,
    searched by one backend (hashing/search/backend.py): the public entry, which checks what it is given,
    and keeps the file format.

    HammingIndex(hash_bit, method, **options) is an empty index; HammingIndex.build(codes, ids) fills one.
    Options per method: flat: use_faiss (None = when installed); mih: substrings (None = from the size);
    ivf: nlist (None = sqrt(N); at most N), nprobe, seed (of the training sample and k-means); hnsw:
    neighbors (FAISS's M), ef_construction, ef_search; auto: none. Integer options are bounded (OPTION_BOUNDS;
    substrings so that no substring is over MAX_SUBSTRING_BITS bits): ValueError here, and UserError for a
    file that names others.

    Where this differs from FAISS's binary indexes: search(q, k) with k > len(index) returns len(index) columns
    (FAISS: k, padded with id -1); search_radius(q, r) includes distance r (FAISS: d < r) and returns one
    (distances, ids) pair per query (FAISS: lims, D, I); ties come out by id.
    """

    def __init__(self, hash_bit, method=DEFAULT_METHOD, **options):
        if method not in METHODS:
            raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(hash_bit, bool) or not isinstance(hash_bit, (int, np.integer)) or \
                not 1 <= hash_bit <= MAX_HASH_BIT:
            raise ValueError(f"hash_bit must be an integer from 1 to {MAX_HASH_BIT}, got {hash_bit!r}")
        problem = option_problem(method, options, hash_bit)
        if problem:
            raise OptionError(problem)
        self.hash_bit = int(hash_bit)
        self.method = method
        self.backend = open_backend(method, self.hash_bit, **options)
        self.options = self.backend.options

    @classmethod
    def build(cls, codes, ids=None, hash_bit=None, method=DEFAULT_METHOD, **options):
        """An index of packed `codes` with `ids` (default 0..N-1); hash_bit defaults to 8 bits a byte. The
        search structure is built here, so that the first search does not pay for it."""
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"codes must be a 2-D array of packed rows, got shape {codes.shape}")
        index = cls(codes.shape[1] * 8 if hash_bit is None else hash_bit, method, **options)
        index.add(codes, ids)
        index.backend.prepare()
        return index

    @property
    def code_bytes(self):
        return -(-self.hash_bit // 8)

    @property
    def resolved_method(self):
        """The method a k-nearest search uses now: "auto" resolved by its cost model (hashing/search/auto.py)."""
        return self.backend.method_for() if self.method == "auto" else self.method

    @property
    def exact(self):
        return is_exact(self.method)

    @property
    def ids(self):
        """The ids, ascending (read-only)."""
        return self._read_only(self.backend.store.ids)

    @property
    def codes(self):
        """The codes, one row per id of `ids` (read-only)."""
        return self._read_only(self.backend.store.codes)

    @staticmethod
    def _read_only(array):
        view = array.view()
        view.flags.writeable = False
        return view

    @property
    def nbytes(self):
        """Bytes held: codes, ids and the search structure (built if needed)."""
        return self.backend.nbytes

    def __len__(self):
        return len(self.backend)

    def __repr__(self):
        return f"HammingIndex({len(self):,} codes of {self.hash_bit} bits, method={self.method!r})"

    # ---------- changes ----------

    def _packed(self, codes, what):
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.dtype != np.uint8:
            raise ValueError(f"{what} must be packed uint8 rows (hashing.codes.pack_signs of the network outputs), "
                             f"got {codes.dtype} of shape {codes.shape}")
        if codes.shape[1] != self.code_bytes:
            raise ValueError(f"{what} have {codes.shape[1]} bytes a row, but the index holds {self.hash_bit}-bit "
                             f"codes ({self.code_bytes} bytes)")
        padding = (1 << (-self.hash_bit % 8)) - 1
        if padding and len(codes) and np.any(codes[:, -1] & padding):
            raise ValueError(f"{what} have bits set beyond bit {self.hash_bit}: they are not "
                             f"{self.hash_bit}-bit packed codes")
        return np.ascontiguousarray(codes)

    def add(self, codes, ids=None):
        """Add packed codes under `ids` (default: the ids after the largest one held, or 0..N-1 when empty).
        ValueError for an id already held or given twice. Multi-index tables are changed in place (each
        array copied once), not rebuilt; change an index in batches."""
        codes = self._packed(codes, "codes")
        held_ids = self.backend.store.ids
        if ids is None:
            first = int(held_ids[-1]) + 1 if len(held_ids) else 0
            ids = np.arange(first, first + len(codes), dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (len(codes),) or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D integer array of one id per code ({len(codes)}), got "
                             f"{ids.dtype} of shape {ids.shape}")
        ids = ids.astype(np.int64)
        if len(ids) and ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks a missing result), got {ids.min()}")
        ordered = np.sort(ids)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(repeated):
            raise ValueError(f"ids given more than once: {', '.join(map(str, repeated[:5]))}")
        held = self.backend.store.held(ordered)
        if len(held):
            raise ValueError(f"ids already in the index: {', '.join(map(str, held[:5]))}; remove them first")
        if len(ids):
            self.backend.add(codes, ids)

    def remove(self, ids):
        """Remove the codes of `ids`; ids not held are ignored. Returns how many were removed."""
        return self.backend.remove(np.asarray(ids, dtype=np.int64).ravel())

    # ---------- search ----------

    def search(self, queries, k):
        """(distances, ids), int32 and int64 arrays of shape (Q, min(k, len(self))): each query's k nearest
        codes by Hamming distance, ties by id (FAISS would give k columns, padded with id -1)."""
        queries = self._packed(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        distances, ids = self.backend.search(queries, min(int(k), len(self)))
        return distances.astype(np.int32, copy=False), ids

    def search_radius(self, queries, radius):
        """[(distances, ids)] per query: every code within Hamming distance `radius` (<=, where FAISS's
        range_search keeps d < radius), ties by id; a list of pairs, not FAISS's (lims, D, I)."""
        queries = self._packed(queries, "queries")
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
        return self.backend.search_radius(queries, min(int(radius), self.hash_bit))

    # ---------- file ----------

    def save(self, path):
        """Write the index and its search structure to `path` atomically (hashing/search/index_file.py); an
        existing file is replaced only when it is an index file itself."""
        header = {"hash_bit": self.hash_bit, "rows": len(self), "method": self.method, "options": self.options}
        write_index_file(path, header, self.backend.store.codes, self.backend.store.ids, self.backend.arrays())

    @classmethod
    def load(cls, path, method=None, mmap=False, **options):
        """The index saved at `path`, searched with its saved method and options unless `method` (and its
        `options`) are given; mmap=True maps the codes, ids and saved tables instead of reading them. A saved
        search structure is used when the method and options are the saved ones and it fits the codes (else it
        is rebuilt at the first search). UserError for a file that is not a complete index."""
        header, codes, ids, structure = read_index_file(path, mmap)
        hash_bit = header["hash_bit"]
        saved = method is None or (method == header["method"] and not options)
        if method is None:
            method, options = header["method"], header["options"]
        index = cls(hash_bit, method, **options)
        try:
            index._packed(codes, "codes")
        except ValueError:
            raise UserError(f"index file {path} is damaged (codes with bits beyond bit {hash_bit}); save the index "
                            "again") from None
        if len(ids) and (ids[0] < 0 or np.any(ids[1:] <= ids[:-1])):
            raise UserError(f"index file {path} is damaged (its ids are not increasing and >= 0); save the index "
                            "again")
        if not index.backend.restore(codes, ids, structure if saved else {}):
            index.backend.restore(codes, ids, {})  # rebuilt at the first search
        return index
