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
the rows are ranked by (distance, row); rows are stored in id order (hashing/search/index.py), so that is
(distance, id), the flat scan's ranking to the last tie. How much of the database a search meets depends on
the codes: little for the clustered codes of a trained model or a near-duplicate query, more for uniformly
random codes, whose 100th neighbour among 10 M 64-bit codes lies at distance ~14.

Each table keeps its own copy of the codes in bucket order, so that a bucket is one sequential read
instead of a cache miss per row (2-4x faster on uniformly random codes). m defaults to substrings of about
log2(N) - 7 bits, buckets of about ROWS_PER_BUCKET rows: measured the fastest of m = 3..6 on uniformly
random 64-bit codes at 1 M (m = 5, 1.6 ms a query against 8 ms for m = 3) and 10 M (m = 4); Norouzi et al.'s
log2(N) bits (a row a bucket) probe far more buckets for the same rows. Substrings have at most
MAX_SUBSTRING_BITS bits, so that a table of 2^bits + 1 offsets stays small. Memory per code: m copies of
the code (8 bytes each per 64 bits) and m row numbers (4 bytes each below 2^31 rows).
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from utils.errors import UserError

MAX_SUBSTRING_BITS = 24
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
    """The m tables of a set of packed codes, and their k-nearest and radius searches (rows = positions)."""

    def __init__(self, bits, hash_bit, substrings=None):
        kernel = _kernel()
        self.hash_bit = hash_bit
        self.substrings = int(substrings or default_substrings(hash_bit, len(bits)))
        if not 1 <= self.substrings <= hash_bit or -(-hash_bit // self.substrings) > MAX_SUBSTRING_BITS:
            raise ValueError(f"substrings must be between {math.ceil(hash_bit / MAX_SUBSTRING_BITS)} and {hash_bit} "
                             f"for {hash_bit}-bit codes, got {self.substrings}")
        self.bounds = substring_bounds(hash_bit, self.substrings)
        words = code_words(bits)
        index_type = np.int32 if len(bits) < 2 ** 31 else np.int64
        widths = np.array([end - start for start, end in self.bounds], dtype=np.int64)
        offset_starts = np.concatenate([[0], np.cumsum((1 << widths) + 1)[:-1]]).astype(np.int64)
        offsets = np.zeros(int(np.sum((1 << widths) + 1)), dtype=index_type)
        positions = np.empty((self.substrings, len(bits)), dtype=index_type)
        masks = np.zeros((self.substrings, words.shape[1]), dtype=np.uint64)
        for j, (start, end) in enumerate(self.bounds):
            keys = substring_keys(words, start, end)
            table = offsets[offset_starts[j]:offset_starts[j] + (1 << int(widths[j])) + 1]
            np.cumsum(np.bincount(keys, minlength=1 << int(widths[j])), out=table[1:])
            kernel.fill_table(keys, table, positions[j])
            for bit in range(start, end):
                masks[j, bit // 64] |= np.uint64(1 << (63 - bit % 64))
        self.tables = (masks, widths, offsets, offset_starts, positions, words[positions])

    @property
    def nbytes(self):
        return sum(array.nbytes for array in self.tables)

    def search(self, query_bits, k, max_distance, threads=None):
        """(distances, rows, counts) of kernel.search_chunk over all queries, split over a few threads."""
        kernel = _kernel()
        words = code_words(query_bits)
        keys = np.stack([substring_keys(words, start, end) for start, end in self.bounds], axis=1)
        threads = threads or search_threads()
        size = max(1, -(-len(words) // threads))
        parts = [slice(start, start + size) for start in range(0, len(words), size)]

        def chunk(part):
            return kernel.search_chunk(words[part], keys[part], self.tables, k, max_distance)

        if len(parts) <= 1:
            results = [chunk(slice(None))]
        else:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                results = list(pool.map(chunk, parts))
        return tuple(np.concatenate(column) for column in zip(*results))
