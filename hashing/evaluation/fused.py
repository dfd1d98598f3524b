"""A fused ranking kernel (numba) for the evaluation of hashing/evaluation/metrics.py, with a NumPy fallback there.

NumPy materialises a (queries x database) distance matrix, then sorts or histograms it in further passes; at
NUS-WIDE scale that costs several times the XOR + popcount itself. This kernel does, per query, in one
compiled loop (docs/PERFORMANCE.md, where the evaluation's time goes):

1. XOR + popcount distances d and shared-label counts g of every database item, stored as one small key
   d * (G + 1) + g, and the histogram of the keys: the (distance x shared labels) counts that ties="aware"
   and the radius curves need, and from which the rank of every distance's first item follows;
2. for each requested tie order (database index; ties="random" recomputes the keys on the database permuted
   once up front by the seeded order, cheaper than gathering them), a counting sort of the items at or below
   the boundary distance of the depth K: an item's rank is its distance's first rank plus the items of that
   distance met before it, so no comparison sort is needed;
3. a walk over the first K ranks accumulating the sums every ranking metric needs, in rank order, so the
   floating-point sums equal the NumPy path's exactly.

numba is optional: without it, below MIN_PAIRS query-database pairs, when the keys do not fit 16 bits, or for
queries of more than MAX_GRADE labels,
metrics.py uses NumPy, with identical figures (tests/test_fused.py). The kernel itself is in
hashing/evaluation/fused_kernel.py, imported on first use, so that processes scoring small problems never load numba. Compiled code is cached next to this file, or, on a read-only
checkout, in numba's user-wide cache directory; when neither is writable numba compiles at each start (some
seconds on first use, as after any change to this file).
"""
import importlib.util

import numpy as np

# Columns of the per-rule sums the kernel returns for each query.
SUM_COLUMNS = ("precision_sum", "hits", "weighted_sum", "dcg", "grade_sum")
MAX_KEYS = 1 << 16  # keys are uint16: (n + 1) * (G + 1) distinct (distance, shared labels) pairs at most
# Below this many query-database pairs NumPy takes about as long as loading numba and its cached kernel (1-2 s
# per process), so small problems (the tests, the digits runs) stay on NumPy.
MIN_PAIRS = 1 << 22

# False makes metrics.py take the NumPy path (tests and benchmarks compare both in one process).
enabled = importlib.util.find_spec("numba") is not None


def available():
    return enabled


MAX_GRADE = 62  # the kernel's NDCG gain (1 << g) - 1 is an int64: exact up to g = 62, wrapped from 63


def fits(hash_bit, max_grade, pairs):
    """Whether the kernel serves a problem of `pairs` query-database pairs with these code and label sizes."""
    return available() and pairs >= MIN_PAIRS and (hash_bit + 1) * (max_grade + 1) <= MAX_KEYS and \
        max_grade <= MAX_GRADE


def packed_matrix(word_columns):
    """Word columns (hashing/codes.word_columns) as one C-contiguous (W, N) uint64 matrix for the kernel."""
    return np.ascontiguousarray(np.stack([w.astype(np.uint64) for w in word_columns]))


def rank_chunk(query, databases, depths, log2_positions, out):
    """hashing.evaluation.fused_kernel.rank_chunk (numba imported here, on first use)."""
    from hashing.evaluation import fused_kernel
    fused_kernel.rank_chunk(query, databases, depths, log2_positions, out)
