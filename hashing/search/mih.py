"""Multi-index hashing (Norouzi, Punjani and Fleet, "Fast Search in Hamming Space with Multi-Index Hashing",
CVPR 2012): exact k-nearest and radius search that visits a small part of the database.

The n bits of a code are cut into m substrings of about n/m consecutive bits, and each substring has a table
that groups the rows by their value of it. Two codes at Hamming distance d differ in at most floor(d/m) bits
of some substring (pigeonhole), so a search looks up, in each table, the buckets whose value differs from the
query's in 0 bits, then 1 bit, and so on: substring 0..m-1 at radius 0, then each at radius 1, ... After
substring j at radius s, every row within distance m*s + j of the query has been met: a row not met differs
in more than s bits on substrings 0..j and in at least s on the others. The k-nearest search stops as soon
as k rows within that distance are known, the radius search once it reaches the radius. A row met again
in another table is recognised from its substring distances (no visited set), and each met row's full
distance is computed from its code.

The result is exact and in the evaluator's order: every row within the final distance has been met, and
the rows are ranked by (distance, id) (the tables hold the ids), the flat scan's ranking to the last tie. How much of the database a search meets depends on
the codes: little for the clustered codes of a trained model or a near-duplicate query, more for uniformly
random codes, whose 100th neighbour among 10 M 64-bit codes lies at distance ~14.

Each table keeps its own copy of the codes in bucket order, so that a bucket is one sequential read
instead of a cache miss per row (2-4x faster on uniformly random codes). m defaults to substrings of about
log2(N) - 7 bits, buckets of about ROWS_PER_BUCKET rows: measured the fastest of m = 3..6 on uniformly
random 64-bit codes at 1 M (m = 5, 1.6 ms a query against 8 ms for m = 3) and 10 M (m = 4); Norouzi et al.'s
log2(N) bits (a row a bucket) probe far more buckets for the same rows. Substrings have at most
MAX_SUBSTRING_BITS bits, so that a table of 2^bits + 1 offsets stays small and a search probes no table of
2^24 buckets. Memory per code: m copies of the code (8 bytes each per 64 bits) and m ids (4 bytes each while
every id is below 2^31, else 8).

The tables are changed in place by add and remove (MultiIndexTables.add/remove: each array copied once,
no counting sort, no gather of the codes), and saved with an index file (arrays/from_arrays), so that neither
a change nor a load rebuilds them. MultiIndexBackend is the "mih" search backend (hashing/search/backend.py).
"""
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from utils.errors import UserError

from hashing.search.backend import StoredBackend, empty_result, no_matches, register_backend

# A substring of 24 bits took 0.5 s a query over one code (2^24 buckets to probe): at most 23.
MAX_SUBSTRING_BITS = 23
ROWS_PER_BUCKET = 128
MIN_SUBSTRING_BITS = 8
# Threads a batch of queries is split over (None: up to 4, as many as there are CPUs).
THREADS = None


def search_threads():
    return THREADS or min(4, os.cpu_count() or 1)


def default_substrings(hash_bit, num_rows):
    """m for substrings of about log2(N / ROWS_PER_BUCKET) bits (at least MIN_SUBSTRING_BITS, at most
    MAX_SUBSTRING_BITS), between 1 and n."""
    width = min(max(math.log2(max(num_rows, 1) / ROWS_PER_BUCKET), MIN_SUBSTRING_BITS), MAX_SUBSTRING_BITS)
    return int(min(hash_bit, max(round(hash_bit / width), math.ceil(hash_bit / MAX_SUBSTRING_BITS), 1)))


def code_words(bits):
    """Packed (N, B) uint8 codes as (N, ceil(B / 8)) uint64 words, read big-endian so that code bit t is bit
    63 - t % 64 of word t // 64: a run of consecutive code bits is a run of bits of a word (or of two)."""
    num_rows, num_bytes = bits.shape
    num_words = -(-num_bytes // 8)
    padded = np.zeros((num_rows, num_words * 8), dtype=np.uint8)
    padded[:, :num_bytes] = bits
    return padded.view(">u8").astype(np.uint64)


def substring_bounds(hash_bit, substrings):
    """[(first bit, end bit)] of m substrings of consecutive bits, the first n % m one bit longer."""
    base, longer = divmod(hash_bit, substrings)
    widths = [base + (j < longer) for j in range(substrings)]
    return [(int(end - width), int(end)) for end, width in zip(np.cumsum(widths), widths)]


def substring_keys(words, start, end):
    """The value of code bits [start, end) of each row of code_words, as int64."""
    first, last = start // 64, (end - 1) // 64
    width = end - start
    if first == last:
        shifted = words[:, first] >> np.uint64(64 * (first + 1) - end)
        return (shifted & np.uint64((1 << width) - 1)).astype(np.int64)
    high, low = 64 * last - start, end - 64 * last  # bits taken from the end of `first`, the start of `last`
    head = (words[:, first] & np.uint64((1 << high) - 1)) << np.uint64(low)
    return (head | (words[:, last] >> np.uint64(64 - low))).astype(np.int64)


def _kernel():
    try:
        from hashing.search import mih_kernel
    except ImportError:
        raise UserError("multi-index hashing (method='mih') needs numba: pip install numba (see requirements.txt), "
                        "or use method='flat'") from None
    return mih_kernel


class MultiIndexTables:
    """The m tables of a set of packed codes with int64 ids, and their k-nearest and radius searches (results
    by id). The tables hold the ids themselves, so that add() and remove() change them in place of a rebuild:
    a new code goes to the end of its bucket in each table, a removed one leaves its bucket."""

    def __init__(self, bits, hash_bit, substrings=None, ids=None):
        kernel = _kernel()
        self.hash_bit = hash_bit
        self.substrings = int(substrings or default_substrings(hash_bit, len(bits)))
        check_substrings(hash_bit, self.substrings)
        self.bounds = substring_bounds(hash_bit, self.substrings)
        words = code_words(bits)
        ids = np.arange(len(bits), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        self._layout()
        offsets = np.zeros(self.offset_starts[-1], dtype=np.int64)
        positions = np.empty((self.substrings, len(bits)), dtype=np.int64)
        for j, (start, end) in enumerate(self.bounds):
            keys = substring_keys(words, start, end)
            table = self._table(offsets, j)
            np.cumsum(np.bincount(keys, minlength=len(table) - 1), out=table[1:])
            kernel.fill_table(keys, table, positions[j])
        self.offsets, self.codes = offsets, words[positions]
        self.positions = ids[positions].astype(id_type(ids))

    def _layout(self):
        """The substring masks and widths, and where each table's offsets start (a last entry: their end)."""
        words = -(-self.hash_bit // 64)
        self.widths = np.array([end - start for start, end in self.bounds], dtype=np.int64)
        self.offset_starts = np.concatenate([[0], np.cumsum((1 << self.widths) + 1)]).astype(np.int64)
        self.masks = np.zeros((self.substrings, words), dtype=np.uint64)
        for j, (start, end) in enumerate(self.bounds):
            for bit in range(start, end):
                self.masks[j, bit // 64] |= np.uint64(1 << (63 - bit % 64))

    def _table(self, offsets, j):
        return offsets[self.offset_starts[j]:self.offset_starts[j + 1]]

    @property
    def tables(self):
        return self.masks, self.widths, self.offsets, self.offset_starts[:-1], self.positions, self.codes

    def __len__(self):
        return self.positions.shape[1]

    @property
    def nbytes(self):
        return sum(array.nbytes for array in self.tables)

    def add(self, bits, ids):
        """Insert codes under new ids: each at the end of its bucket in every table (one copy of each array)."""
        words, ids = code_words(bits), np.asarray(ids, dtype=np.int64)
        if self.positions.dtype == np.int32 and id_type(ids) == np.int64:
            self.positions = self.positions.astype(np.int64)  # an id beyond int32: all tables widen once
        positions, codes = [], []
        for j, (start, end) in enumerate(self.bounds):
            keys = substring_keys(words, start, end)
            order = np.argsort(keys, kind="stable")
            table = self._table(self.offsets, j)
            places = table[keys[order] + 1]
            positions.append(np.insert(self.positions[j], places, ids[order]))
            codes.append(np.insert(self.codes[j], places, words[order], axis=0))
            table[1:] += np.cumsum(np.bincount(keys, minlength=len(table) - 1))
        self.positions, self.codes = np.stack(positions), np.stack(codes)

    def remove(self, ids):
        """Drop the codes of `ids` from every table; returns how many were held."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(ids) or not len(self):
            return 0
        positions, codes, removed = [], [], 0
        for j in range(self.substrings):
            places = np.minimum(np.searchsorted(ids, self.positions[j]), len(ids) - 1)
            gone = ids[places] == self.positions[j]
            removed = int(gone.sum())
            table = self._table(self.offsets, j)
            buckets = np.searchsorted(table, np.flatnonzero(gone), side="right") - 1
            table[1:] -= np.cumsum(np.bincount(buckets, minlength=len(table) - 1))
            positions.append(self.positions[j][~gone])
            codes.append(self.codes[j][~gone])
        if removed:
            self.positions, self.codes = np.stack(positions), np.stack(codes)
        return removed

    def arrays(self):
        """The tables as arrays to save (from_arrays takes them back)."""
        return {"substrings": np.array([self.substrings], dtype=np.int64), "offsets": self.offsets,
                "positions": self.positions, "table_codes": self.codes}

    @classmethod
    def from_arrays(cls, hash_bit, ids, arrays):
        """Tables saved by arrays() for codes with `ids`, checked so that a search never reads outside them (a
        bucket's offsets within the codes, ascending); ValueError when they do not fit."""
        tables = cls.__new__(cls)
        substrings = arrays.get("substrings")
        if substrings is None or substrings.shape != (1,):
            raise ValueError("the multi-index tables do not say how many substrings they have")
        tables.hash_bit, tables.substrings = hash_bit, int(substrings[0])
        check_substrings(hash_bit, tables.substrings)
        tables.bounds = substring_bounds(hash_bit, tables.substrings)
        tables._layout()
        offsets, positions, codes = (arrays.get(name) for name in ("offsets", "positions", "table_codes"))
        words = -(-hash_bit // 64)
        if offsets is None or positions is None or codes is None or offsets.shape != (tables.offset_starts[-1],) \
                or positions.shape != (tables.substrings, len(ids)) or \
                codes.shape != (tables.substrings, len(ids), words):
            raise ValueError("the multi-index tables do not have the shapes of the codes")
        for j in range(tables.substrings):
            table = tables._table(offsets, j)
            if table[0] != 0 or table[-1] != len(ids) or np.any(np.diff(table) < 0):
                raise ValueError(f"the offsets of multi-index table {j} are not ascending from 0 to the codes held")
        tables.offsets = np.array(offsets, dtype=np.int64)  # a copy: add and remove change it in place
        if positions.dtype not in (np.int32, np.int64) or codes.dtype != np.uint64:
            raise ValueError("the multi-index tables' ids are not int32 or int64, or their codes not uint64")
        tables.positions, tables.codes = positions, codes
        return tables

    def search(self, query_bits, k, max_distance, threads=None):
        """(distances, ids, counts) of kernel.search_chunk over all queries, split over a few threads."""
        kernel = _kernel()
        words = code_words(query_bits)
        keys = np.stack([substring_keys(words, start, end) for start, end in self.bounds], axis=1)
        threads = threads or search_threads()
        size = max(1, -(-len(words) // threads))
        parts = [slice(start, start + size) for start in range(0, len(words), size)]
        tables = self.tables

        def chunk(part):
            return kernel.search_chunk(words[part], keys[part], tables, k, max_distance)

        if len(parts) <= 1:
            results = [chunk(slice(None))]
        else:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                results = list(pool.map(chunk, parts))
        return tuple(np.concatenate(column) for column in zip(*results))


def id_type(ids):
    """int32 while every id fits (4 bytes a code and table instead of 8), else int64."""
    return np.int32 if not len(ids) or int(np.max(ids)) < 2 ** 31 else np.int64


def check_substrings(hash_bit, substrings):
    """ValueError unless `substrings` cuts hash_bit bits into substrings of 1 to MAX_SUBSTRING_BITS bits."""
    low = math.ceil(hash_bit / MAX_SUBSTRING_BITS)
    if not low <= substrings <= hash_bit:
        raise ValueError(f"option substrings must be from {low} to {hash_bit} for {hash_bit}-bit codes (substrings "
                         f"of at most {MAX_SUBSTRING_BITS} bits: a longer one makes a table of 2^bits buckets that "
                         f"costs seconds a query), got {substrings}")


def segments(distances, ids, counts):
    """Per-query (distances int32, ids int64) from results laid end to end, counts[q] for query q."""
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [(distances[a:b].astype(np.int32), ids[a:b].astype(np.int64)) for a, b in itertools.pairwise(bounds)]


@register_backend
class MultiIndexBackend(StoredBackend):
    """Exact search by multi-index hashing: substrings = m (None = from the size when the tables are first
    built, so that a bucket holds ~ROWS_PER_BUCKET codes). The tables are built at the first search (or
    restored from an index file) and then changed in place by add and remove."""

    name = "mih"
    OPTIONS = {"substrings": None}

    def __init__(self, hash_bit, **options):
        super().__init__(hash_bit, **options)
        if self.options.get("substrings") is not None:  # "auto" (a subclass) takes no options
            check_substrings(self.hash_bit, self.options["substrings"])
        self.tables = None
        self._building = threading.Lock()  # concurrent first searches build the tables once

    @property
    def nbytes(self):
        return self._store.nbytes + (self.built().nbytes if len(self) else 0)

    def add(self, codes, ids):
        super().add(codes, ids)
        if self.tables is not None:
            self.tables.add(codes, ids)

    def remove(self, ids):
        removed = super().remove(ids)
        if removed and self.tables is not None:
            self.tables.remove(ids)
        return removed

    def arrays(self):
        return self.built().arrays() if len(self) else {}

    def restore(self, codes, ids, arrays):
        tables = None
        if arrays:  # checked first: tables that do not fit change nothing (auto's FAISS copy is built once)
            if not len(ids):
                return False
            try:
                tables = MultiIndexTables.from_arrays(self.hash_bit, ids, arrays)
            except (ValueError, TypeError):
                return False
            if self.options.get("substrings") not in (None, tables.substrings):
                return False
        super().restore(codes, ids, {})
        self.tables = tables
        return True

    def prepare(self):
        if len(self):
            self.built()

    def built(self):
        with self._building:
            if self.tables is None:
                self.tables = MultiIndexTables(self._store.codes, self.hash_bit, self.options.get("substrings"),
                                               self._store.ids)
            return self.tables

    def search(self, queries, k):
        k = min(int(k), len(self))
        if k == 0 or not len(queries):
            return empty_result(len(queries), k)
        distances, ids, _ = self.built().search(queries, k, self.hash_bit)
        return distances.astype(np.int32).reshape(len(queries), k), ids.reshape(len(queries), k)

    def search_radius(self, queries, radius):
        if not len(self):
            return no_matches(len(queries))
        return segments(*self.built().search(queries, np.iinfo(np.int64).max, min(int(radius), self.hash_bit)))
