"""A Hamming index over packed binary codes with integer ids: build it, add and remove ids, save and load it,
and search it for the k nearest codes or for every code within a Hamming radius.

Order. Results come in the evaluator's order (docs/METHOD.md §3.2): ascending Hamming distance, ties by id
ascending. With ids = database indices (the default) that is the ranking mAP scores and `--query` prints.
The index keeps its rows sorted by id, so every method's "ties by row" is "ties by id".

Methods (`method=`; docs/SEARCH.md has the measured figures):

- "flat" (exact): every code is compared. FAISS's IndexBinaryFlat when FAISS is installed, else NumPy
  (hashing/metrics.rank_top_k). FAISS is exact and, as checked against its source and by
  tests/test_search.py, already orders ties by row: it scans the rows in order, admits a row only when it
  is strictly closer than the current k-th, and its heap compares (distance, row) pairs; results are still
  re-sorted by (distance, row), a no-op with the FAISS version pinned in requirements.txt. Which tied rows a
  FAISS version keeps at the k-th distance no re-sort could repair, so the tests check FAISS alone against
  brute force too. hashing/search/exact.py's search() (used by --query) is this method: one ranking
  implementation.
- "mih" (exact): multi-index hashing (hashing/search/mih.py, numba), which visits only the rows that can be among
  the result; identical results to "flat" to the last tie.
- "ivf" (approximate): FAISS's IndexBinaryIVF: the codes are clustered, and a search scans the `nprobe`
  nearest of `nlist` clusters, so it misses neighbours in other clusters.
- "hnsw" (approximate): FAISS's IndexBinaryHNSW, a neighbourhood graph walked greedily, so it misses
  neighbours the walk does not reach. FAISS builds the graph on several threads, which makes it depend on
  thread timing (faiss issue #5387: results change under a Hamming isometry); here it is built on one
  thread, so the same codes give the same graph. No radius search.
- "auto" (the default): "mih" from AUTO_MIH_ROWS codes on (when numba is installed), "flat" below.

An approximate method returns the rows it found in the same order; a query for which it found fewer than k
codes gets id -1 at distance hash_bit + 1 in the missing places.

Changes. add() and remove() copy the arrays (O(N)), and the search structure is rebuilt at the next search,
so change an index in batches. Several threads may search an index at once, but none may change it while
another searches it.

File. save() writes atomically: MAGIC, a little-endian uint32 header length, a JSON header (format,
hash_bit, rows, method, options) padded to a multiple of 64 bytes, then the codes (rows x ceil(hash_bit / 8)
bytes) and the ids (rows little-endian int64). load() refuses anything but a regular file, checks the header
against the file size before reading the arrays, and checks that the ids increase and the padding bits are 0;
the search structures are rebuilt, never read from the file. load(mmap=True) maps the arrays instead of
reading them.
"""
import importlib.util
import itertools
import json
import math
import struct
import threading

import numpy as np

from utils.atomic import atomic_write
from utils.documents import parse_json
from utils.errors import UserError
from utils.paths import check_output_target, open_regular, require_regular_file

from hashing.codes import hamming_distances, word_columns
from hashing.evaluation.metrics import rank_top_k
from hashing.search.mih import MAX_SUBSTRING_BITS, MultiIndexTables

MAGIC = b"hyp2-hamming-index\n"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 16
MAX_HASH_BIT = 1 << 16
ALIGNMENT = 64
# From this many codes "auto" uses multi-index hashing (docs/SEARCH.md: the figures it is chosen from).
AUTO_MIH_ROWS = 100_000
# Exactness of each method, and the options it takes (with their defaults; None = chosen from the data).
METHODS = {"auto": True, "flat": True, "mih": True, "ivf": False, "hnsw": False}
OPTIONS = {"auto": {}, "flat": {"use_faiss": None}, "mih": {"substrings": None},
           "ivf": {"nlist": None, "nprobe": 16, "seed": 0},
           "hnsw": {"neighbors": 16, "ef_construction": 40, "ef_search": 128}}
# Inclusive bounds of the integer options: an index file is data, so the options it names are checked before
# anything is built ("neighbors": 10**6 took 15 GB, nlist 10**9 a MemoryError, ef_search -1 returned ids of -1).
OPTION_BOUNDS = {"nlist": (1, 1 << 16), "nprobe": (1, 1 << 16), "seed": (0, 2 ** 31 - 1), "neighbors": (2, 256),
                 "ef_construction": (1, 1 << 12), "ef_search": (1, 1 << 16)}
DEFAULT_METHOD = "auto"
# Query rows x database items per chunk of the NumPy flat scan: bounded memory, as in hashing.evaluation.metrics.
_CHUNK_ELEMENTS = 1 << 20


def faiss_available():
    return importlib.util.find_spec("faiss") is not None


def numba_available():
    return importlib.util.find_spec("numba") is not None


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("this needs FAISS: pip install faiss-cpu (see requirements.txt)") from None
    return faiss


def faiss_flat_index(bits):
    """A FAISS IndexBinaryFlat holding packed codes, FAISS id = row."""
    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    index = import_faiss().IndexBinaryFlat(bits.shape[1] * 8)
    index.add(bits)
    return index


def option_problem(method, options, hash_bit):
    """What is wrong with a method's `options` for `hash_bit`-bit codes ("option NAME ..."), else None."""
    unknown = set(options) - set(OPTIONS[method])
    if unknown:
        return (f"method {method!r} takes no option {', '.join(sorted(map(str, unknown)))}; its options: "
                f"{', '.join(OPTIONS[method]) or 'none'}")
    bounds = {**OPTION_BOUNDS, "substrings": (math.ceil(hash_bit / MAX_SUBSTRING_BITS), hash_bit)}
    for name, value in options.items():
        if name == "use_faiss":
            if value is not None and not isinstance(value, bool):
                return f"option use_faiss must be true, false or null, got {value!r}"
            continue
        low, high = bounds[name]
        if value is None and name in ("nlist", "substrings"):  # chosen from the data
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            return f"option {name} must be an integer from {low} to {high}, got {value!r}"
    return None


def is_exact(method):
    """Whether a method's results are exactly the flat scan's (METHODS)."""
    return METHODS[method]


def order_by_distance_then_row(distances, rows):
    """Each result row re-sorted by (distance, row)."""
    order = np.lexsort((rows, distances), axis=-1)
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _segments(distances, rows, counts):
    """Per-query (distances int32, rows int64) from results laid end to end, counts[q] for query q."""
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [(distances[a:b].astype(np.int32), rows[a:b].astype(np.int64)) for a, b in itertools.pairwise(bounds)]


def _ranked_range_result(lims, distances, rows):
    """FAISS range_search output (lims, D, I) as per-query lists in (distance, row) order."""
    results = []
    for start, end in itertools.pairwise(lims):
        order = np.lexsort((rows[start:end], distances[start:end]))
        results.append((distances[start:end][order].astype(np.int32), rows[start:end][order].astype(np.int64)))
    return results


class _Flat:
    """Exact scan of every code: FAISS IndexBinaryFlat, or NumPy."""

    def __init__(self, codes, hash_bit, use_faiss=None):
        self.use_faiss = faiss_available() if use_faiss is None else bool(use_faiss)
        self.codes = codes
        self.faiss_index = faiss_flat_index(codes) if self.use_faiss else None

    @property
    def nbytes(self):
        return self.faiss_index.ntotal * self.faiss_index.code_size if self.use_faiss else 0

    def _distance_chunks(self, queries):
        """The distances of one chunk of queries after another to every code: bounded memory per chunk."""
        query_words, code_words = word_columns(queries), word_columns(self.codes)
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(len(self.codes), 1))
        for start in range(0, len(queries), rows_per_chunk):
            yield hamming_distances([w[start:start + rows_per_chunk] for w in query_words], code_words,
                                           self.codes.shape[1] * 8)  # the padding bits are 0 on both sides

    def nearest(self, queries, k):
        if self.use_faiss:
            # A no-op re-sort with the pinned FAISS (its ties already come out by row); kept as a guard.
            return order_by_distance_then_row(*self.faiss_index.search(queries, k))
        distances, rows = [], []
        for dist in self._distance_chunks(queries):
            ranked = rank_top_k(dist, k)
            distances.append(np.take_along_axis(dist, ranked, axis=1).astype(np.int32))
            rows.append(ranked.astype(np.int64))
        return np.concatenate(distances), np.concatenate(rows)

    def within(self, queries, radius):
        if self.use_faiss:
            return _ranked_range_result(*self.faiss_index.range_search(queries, radius + 1))  # FAISS: d < radius
        results = []
        for dist in self._distance_chunks(queries):
            for row in dist:
                inside = np.flatnonzero(row <= radius)
                order = np.argsort(row[inside], kind="stable")
                results.append((row[inside][order].astype(np.int32), inside[order].astype(np.int64)))
        return results


class _MultiIndexHashing:
    """Exact search by multi-index hashing (hashing/search/mih.py)."""

    def __init__(self, codes, hash_bit, substrings=None):
        self.tables = MultiIndexTables(codes, hash_bit, substrings)
        self.hash_bit = hash_bit

    @property
    def nbytes(self):
        return self.tables.nbytes

    def nearest(self, queries, k):
        distances, rows, _ = self.tables.search(queries, k, self.hash_bit)
        return distances.astype(np.int32).reshape(len(queries), k), rows.reshape(len(queries), k)

    def within(self, queries, radius):
        return _segments(*self.tables.search(queries, np.iinfo(np.int64).max, radius))


class _FaissApproximate:
    """FAISS's IndexBinaryIVF or IndexBinaryHNSW over the rows (FAISS id = row)."""

    def __init__(self, codes, hash_bit, method, **options):
        faiss = import_faiss()
        self.method, self.hash_bit = method, hash_bit
        dimension = codes.shape[1] * 8
        if method == "ivf":
            # FAISS's k-means needs at least as many codes as clusters (an index may shrink after it is saved)
            nlist = min(options["nlist"] or max(1, round(math.sqrt(len(codes)))), len(codes))
            self.index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dimension), dimension, nlist)
            self.index.cp.seed = options["seed"]
            sample = np.random.default_rng(options["seed"]).choice(len(codes), min(len(codes), 64 * nlist),
                                                                    replace=False)
            self.index.train(codes[np.sort(sample)])
            self.index.add(codes)
            self.index.nprobe = options["nprobe"]
        else:
            self.index = faiss.IndexBinaryHNSW(dimension, options["neighbors"])
            self.index.hnsw.efConstruction = options["ef_construction"]
            self.index.hnsw.efSearch = options["ef_search"]
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)  # one thread: the graph does not depend on thread timing (faiss #5387)
            try:
                self.index.add(codes)
            finally:
                faiss.omp_set_num_threads(threads)

    @property
    def nbytes(self):
        index = self.index
        if self.method == "ivf":
            return index.ntotal * (index.code_size + 8) + index.nlist * index.code_size
        hnsw = index.hnsw
        return index.ntotal * index.code_size + 4 * (hnsw.neighbors.size() + hnsw.levels.size()) + \
            8 * hnsw.offsets.size()

    def nearest(self, queries, k):
        distances, rows = self.index.search(queries, k)
        distances[rows < 0] = self.hash_bit + 1
        return order_by_distance_then_row(distances, rows)

    def within(self, queries, radius):
        if self.method == "hnsw":
            raise ValueError("method 'hnsw' has no radius search (FAISS has none for binary HNSW); "
                             "use method 'mih' or 'flat'")
        return _ranked_range_result(*self.index.range_search(queries, radius + 1))


class HammingIndex:
    """Packed binary codes (hashing/codes.py: uint8 rows of ceil(hash_bit / 8) bytes) with int64 ids >= 0.

    HammingIndex(hash_bit, method, **options) is an empty index; HammingIndex.build(codes, ids) fills one.
    Options per method (OPTIONS): flat: use_faiss (None = when installed); mih: substrings (None = from the
    size); ivf: nlist (None = sqrt(N); at most N), nprobe, seed (of the training sample and k-means); hnsw:
    neighbors (FAISS's M), ef_construction, ef_search. Integer options are bounded (OPTION_BOUNDS; substrings so
    that no substring is over MAX_SUBSTRING_BITS bits): ValueError here, and UserError for a file that names others.
    """

    def __init__(self, hash_bit, method=DEFAULT_METHOD, **options):
        if method not in METHODS:
            raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(hash_bit, bool) or not isinstance(hash_bit, (int, np.integer)) or \
                not 1 <= hash_bit <= MAX_HASH_BIT:
            raise ValueError(f"hash_bit must be an integer from 1 to {MAX_HASH_BIT}, got {hash_bit!r}")
        problem = option_problem(method, options, hash_bit)
        if problem:
            raise ValueError(problem)
        self.hash_bit = int(hash_bit)
        self.method = method
        self.options = {**OPTIONS[method], **options}
        self._codes = np.zeros((0, self.code_bytes), dtype=np.uint8)
        self._ids = np.zeros(0, dtype=np.int64)
        self._search_structure = None
        self._building = threading.Lock()  # concurrent first searches build the structure once

    @classmethod
    def build(cls, codes, ids=None, hash_bit=None, method=DEFAULT_METHOD, **options):
        """An index of packed `codes` with `ids` (default 0..N-1); hash_bit defaults to 8 bits a byte. The
        search structure is built here, so that the first search does not pay for it."""
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"codes must be a 2-D array of packed rows, got shape {codes.shape}")
        index = cls(codes.shape[1] * 8 if hash_bit is None else hash_bit, method, **options)
        index.add(codes, ids)
        if len(index):
            index._structure()
        return index

    @property
    def code_bytes(self):
        return -(-self.hash_bit // 8)

    @property
    def resolved_method(self):
        """The method searches use: "auto" resolved for the current size."""
        if self.method != "auto":
            return self.method
        return "mih" if len(self) >= AUTO_MIH_ROWS and numba_available() else "flat"

    @property
    def exact(self):
        return is_exact(self.method)

    @property
    def ids(self):
        """The ids, ascending (read-only)."""
        return self._read_only(self._ids)

    @property
    def codes(self):
        """The codes, one row per id of `ids` (read-only)."""
        return self._read_only(self._codes)

    @staticmethod
    def _read_only(array):
        view = array.view()
        view.flags.writeable = False
        return view

    @property
    def nbytes(self):
        """Bytes held: codes, ids and the search structure (built if needed)."""
        structure = self._structure() if len(self) else None
        return self._codes.nbytes + self._ids.nbytes + (structure.nbytes if structure is not None else 0)

    def __len__(self):
        return len(self._ids)

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
        ValueError for an id already held or given twice."""
        codes = self._packed(codes, "codes")
        if ids is None:
            first = int(self._ids[-1]) + 1 if len(self) else 0
            ids = np.arange(first, first + len(codes), dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (len(codes),) or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D integer array of one id per code ({len(codes)}), got "
                             f"{ids.dtype} of shape {ids.shape}")
        ids = ids.astype(np.int64)
        if len(ids) and ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks a missing result), got {ids.min()}")
        order = np.argsort(ids, kind="stable")
        ids, codes = ids[order], codes[order]
        repeated = ids[1:][ids[1:] == ids[:-1]]
        if len(repeated):
            raise ValueError(f"ids given more than once: {', '.join(map(str, repeated[:5]))}")
        places = np.searchsorted(self._ids, ids)
        held = ids[(places < len(self)) & (self._ids[np.minimum(places, len(self) - 1)] == ids)] if len(self) else []
        if len(held):
            raise ValueError(f"ids already in the index: {', '.join(map(str, held[:5]))}; remove them first")
        if not len(self) or not len(ids) or ids[0] > self._ids[-1]:
            self._ids = np.concatenate([self._ids, ids])
            self._codes = np.concatenate([self._codes, codes])
        else:
            self._ids = np.insert(self._ids, places, ids)
            self._codes = np.insert(self._codes, places, codes, axis=0)
        self._search_structure = None

    def remove(self, ids):
        """Remove the codes of `ids`; ids not held are ignored. Returns how many were removed."""
        keep = ~np.isin(self._ids, np.asarray(ids, dtype=np.int64).ravel())
        removed = len(self) - int(keep.sum())
        if removed:
            self._ids, self._codes = self._ids[keep], self._codes[keep]
            self._search_structure = None
        return removed

    # ---------- search ----------

    def _structure(self):
        with self._building:
            if self._search_structure is None:
                self._search_structure = self._new_structure()
            return self._search_structure

    def _new_structure(self):
        method = self.resolved_method
        options = {} if self.method == "auto" else self.options
        if method == "flat":
            return _Flat(self._codes, self.hash_bit, **options)
        if method == "mih":
            return _MultiIndexHashing(self._codes, self.hash_bit, **options)
        return _FaissApproximate(self._codes, self.hash_bit, method, **options)

    def _ids_of(self, rows):
        return np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1) if len(self) else rows

    def search(self, queries, k):
        """(distances, ids), int32 and int64 arrays of shape (Q, min(k, len(self))): each query's k nearest
        codes by Hamming distance, ties by id."""
        queries = self._packed(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = min(int(k), len(self))
        if k == 0 or len(queries) == 0:
            return np.zeros((len(queries), k), dtype=np.int32), np.zeros((len(queries), k), dtype=np.int64)
        distances, rows = self._structure().nearest(queries, k)
        return distances.astype(np.int32, copy=False), self._ids_of(rows)

    def search_radius(self, queries, radius):
        """[(distances, ids)] per query: every code within Hamming distance `radius` (<=), ties by id."""
        queries = self._packed(queries, "queries")
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
        if not len(self):
            return [(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)) for _ in queries]
        results = self._structure().within(queries, min(int(radius), self.hash_bit))
        return [(distances, self._ids_of(rows)) for distances, rows in results]

    # ---------- file ----------

    def _header(self):
        header = {"format": FORMAT_VERSION, "hash_bit": self.hash_bit, "rows": len(self), "method": self.method,
                  "options": self.options}
        text = json.dumps(header, sort_keys=True).encode()
        data_offset = -(-(len(MAGIC) + 4 + len(text)) // ALIGNMENT) * ALIGNMENT
        return text + b" " * (data_offset - len(MAGIC) - 4 - len(text))

    def save(self, path):
        """Write the index to `path` atomically (the file format is in this module's docstring); an existing file
        is replaced only when it is an index file itself (begins with MAGIC), never a file of another kind."""
        path = check_output_target(path, "index file", earlier_output=("a Hamming index file", is_index_file))
        header = self._header()
        ids = np.ascontiguousarray(self._ids, dtype="<i8")

        def write(handle):
            handle.write(MAGIC + struct.pack("<I", len(header)) + header)
            for array in (np.ascontiguousarray(self._codes), ids):  # no copy of a large array
                handle.write(memoryview(array.reshape(-1).view(np.uint8)))
        atomic_write(path, write, binary=True)

    @classmethod
    def load(cls, path, method=None, mmap=False, **options):
        """The index saved at `path`, searched with its saved method and options unless `method` (and its
        `options`) are given; mmap=True maps the codes and ids instead of reading them. UserError for a
        file that is not a complete index."""
        path = require_regular_file(path, "index file", missing="pass the path of a file written by "
                                                                "HammingIndex.save")
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header, data_offset = _read_header(handle, path)
            hash_bit, rows = header["hash_bit"], header["rows"]
            code_bytes = -(-hash_bit // 8)
            expected = data_offset + rows * (code_bytes + 8)
            if size != expected:
                state = "is truncated" if size < expected else f"has {size - expected:,} bytes more than that"
                raise UserError(f"index file {path} {state}: its header declares {rows:,} codes of {hash_bit} bits "
                                f"({expected:,} bytes) and the file has {size:,} bytes; save the index again")
            if method is None:
                method, options = header["method"], header["options"]
            index = cls(hash_bit, method, **options)
            index._codes, index._ids = _read_arrays(handle, path, data_offset, rows, code_bytes, mmap)
        try:
            index._packed(index._codes, "codes")
        except ValueError:
            raise UserError(f"index file {path} is damaged (codes with bits beyond bit {hash_bit}); save the index "
                            "again") from None
        if rows and (index._ids[0] < 0 or np.any(index._ids[1:] <= index._ids[:-1])):
            raise UserError(f"index file {path} is damaged (its ids are not increasing and >= 0); save the index "
                            "again")
        return index


def is_index_file(path):
    """Whether `path` is a regular file that begins with MAGIC: the one kind of existing file save() replaces."""
    with open_regular(path, "index file") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def _read_header(handle, path):
    """(header dict, offset of the arrays) of an open index file; UserError for anything unexpected."""
    def damaged(reason):
        return UserError(f"index file {path} {reason}; pass a file written by HammingIndex.save, or save it again")

    if handle.read(len(MAGIC)) != MAGIC:
        raise damaged("is not a Hamming index of this project (its first bytes differ)")
    length_bytes = handle.read(4)
    if len(length_bytes) < 4:
        raise damaged("is truncated within its header")
    length = struct.unpack("<I", length_bytes)[0]
    if length > MAX_HEADER_BYTES:
        raise damaged(f"declares a {length:,}-byte header, more than the {MAX_HEADER_BYTES:,} allowed")
    text = handle.read(length)
    if len(text) < length:
        raise damaged("is truncated within its header")
    header = parse_json(text, f"index file {path}", "pass a file written by HammingIndex.save, or save it again")
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise damaged(f"has format {header.get('format') if isinstance(header, dict) else '?'}, not "
                      f"{FORMAT_VERSION}")
    hash_bit, rows, method = header.get("hash_bit"), header.get("rows"), header.get("method")
    if not isinstance(hash_bit, int) or not 1 <= hash_bit <= MAX_HASH_BIT:
        raise damaged(f"declares {hash_bit!r} bits a code")
    if not isinstance(rows, int) or rows < 0:
        raise damaged(f"declares {rows!r} codes")
    if method not in METHODS or not isinstance(header.get("options"), dict):
        raise damaged(f"names an unknown search method or options ({method!r}, {header.get('options')!r})")
    problem = option_problem(method, header["options"], hash_bit)
    if problem:
        raise damaged(f"names options that are out of bounds: {problem}")
    return header, len(MAGIC) + 4 + length


def _read_arrays(handle, path, offset, rows, code_bytes, mmap):
    """(codes (rows, code_bytes) uint8, ids (rows,) int64) stored from `offset`, read or memory-mapped."""
    if rows == 0:
        return np.zeros((0, code_bytes), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    if mmap:
        codes = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(rows, code_bytes))
        ids = np.memmap(path, dtype="<i8", mode="r", offset=offset + rows * code_bytes, shape=(rows,))
        return codes, ids
    handle.seek(offset)
    codes = np.fromfile(handle, dtype=np.uint8, count=rows * code_bytes)
    ids = np.fromfile(handle, dtype="<i8", count=rows)
    if len(codes) < rows * code_bytes or len(ids) < rows:  # the file shrank since its size was checked
        raise UserError(f"index file {path} is truncated; save the index again")
    return codes.reshape(rows, code_bytes), ids.astype(np.int64, copy=False)
