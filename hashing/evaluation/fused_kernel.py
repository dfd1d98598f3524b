"""The numba code of hashing/evaluation/fused.py (its docstring describes the three steps); imported only when a problem is
large enough to use it."""
import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic


def _compiled(function):
    """numba.njit, the machine code cached on disk where numba finds a writable place (next to this file, else
    its user-wide cache directory, or NUMBA_CACHE_DIR); on a read-only checkout and home, compiled at each start."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available": no writable cache location
        return numba.njit(nogil=True)(function)


@intrinsic
def _popcount(typingctx, value):
    """The CPU's popcount of a uint64 (LLVM's ctpop), which np.bitwise_count does not offer in numba."""
    def codegen(context, builder, signature, args):
        function = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(function, args)
    return numba.types.int64(numba.types.uint64), codegen


@_compiled
def _compute_keys(query_words, database, num_grades, keys):
    """Step 1 for one query: keys[i] = distance * num_grades + shared labels, word by word over the database
    so that the loops vectorise."""
    query_codes, query_labels = query_words
    db_codes, db_labels = database
    num_items = db_codes.shape[1]
    for item in range(num_items):
        keys[item] = _popcount(query_codes[0] ^ db_codes[0, item]) * num_grades
    for word in range(1, db_codes.shape[0]):
        for item in range(num_items):
            keys[item] += _popcount(query_codes[word] ^ db_codes[word, item]) * num_grades
    for word in range(db_labels.shape[0]):
        for item in range(num_items):
            keys[item] += _popcount(query_labels[word] & db_labels[word, item])


@_compiled
def _count_keys(keys, histograms):
    """The histogram of the keys, summed over the four rows of `histograms`: consecutive items, often of the
    same key, go to different rows, so that the increments do not wait for each other."""
    num_items = len(keys)
    histograms[:] = 0
    whole = num_items - num_items % 4
    for item in range(0, whole, 4):
        histograms[0, keys[item]] += 1
        histograms[1, keys[item + 1]] += 1
        histograms[2, keys[item + 2]] += 1
        histograms[3, keys[item + 3]] += 1
    for item in range(whole, num_items):
        histograms[0, keys[item]] += 1


@_compiled
def _rank_grades(keys, first_rank, num_grades, ranked, candidates):
    """Step 2: ranked[t] = shared labels of the item of rank t (0-based), for t < len(ranked), ties by index;
    first_rank[d] is the rank of the first item at distance d, candidates an int32 scratch of len(keys) + 1.
    Keys split into (distance, grade) by table: a 64-bit integer division per item would cost more than the
    rest of the loop."""
    depth = len(ranked)
    next_rank = first_rank.copy()
    boundary = 0  # the smallest distance whose items reach rank `depth`
    while boundary < len(first_rank) - 1 and first_rank[boundary + 1] < depth:
        boundary += 1
    limit = (boundary + 1) * num_grades
    distance_of = np.empty(limit, np.int64)
    for key in range(limit):
        distance_of[key] = key // num_grades
    found = 0
    everything = boundary == len(first_rank) - 1
    if not everything:
        for item in range(len(keys)):  # a branch-free compaction of the few items at or below the boundary
            candidates[found] = item
            found += keys[item] < limit
    for candidate in range(len(keys) if everything else found):
        key = keys[candidate if everything else candidates[candidate]]
        distance = distance_of[key]
        rank = next_rank[distance]
        next_rank[distance] = rank + 1
        if rank < depth:
            ranked[rank] = key - distance * num_grades


@_compiled
def _ranking_sums(ranked, k, log2_positions, sums, hits_so_far):
    """Step 3: the SUM_COLUMNS of the first k ranks (each in rank order, as metrics' NumPy path adds them),
    and hits_so_far[t] = relevant items among the first t + 1 ranks."""
    hits = grade_sum = 0
    precision_sum = weighted_sum = dcg = 0.0
    for t in range(len(ranked)):
        grade = np.int64(ranked[t])
        if grade > 0:
            hits += 1
            if t < k:
                grade_sum += grade
                precision_sum += hits / (t + 1)
                weighted_sum += grade_sum / (t + 1)
                dcg += ((np.int64(1) << grade) - 1) / log2_positions[t]
        hits_so_far[t] = hits
    sums[0], sums[2], sums[3], sums[4] = precision_sum, weighted_sum, dcg, grade_sum
    sums[1] = hits_so_far[k - 1] if k > 0 else 0


@_compiled
def rank_chunk(query, databases, depths, log2_positions, out):
    """Steps 1-3 for each query of a chunk.

    query: (codes, labels) (m, W) / (m, L) uint64. databases: ((codes, labels), shuffled) with codes (W, N)
    and labels (L, N) uint64, shuffled the same permuted by ties="random"'s seeded order, or empty (0 items)
    when not wanted. depths: (k, top_ns int64 array, with_index). out: (counts (m, n + 1, G + 1) int64,
    sums (R, m, 5) float64, hits_at_top_n (R, m, len(top_ns)) int64), R the ranked rules (index, random).
    """
    query_codes, query_labels = query
    database, shuffled = databases
    k, top_ns, with_index = depths
    counts, sums, hits_at_top_n = out
    num_distances, num_grades = counts.shape[1], counts.shape[2]
    depth = k
    for n in top_ns:
        depth = max(depth, n)
    keys = np.empty(database[0].shape[1], np.uint16)
    histograms = np.empty((4, num_distances * num_grades), np.int64)
    ranked = np.empty(depth, np.uint16)
    hits_so_far = np.empty(depth, np.int64)
    first_rank = np.empty(num_distances, np.int64)
    candidates = np.empty(len(keys) + 1, np.int32)
    for q in range(query_codes.shape[0]):
        query_words = (query_codes[q], query_labels[q])
        _compute_keys(query_words, database, num_grades, keys)
        _count_keys(keys, histograms)
        counts[q] = histograms.sum(axis=0).reshape(num_distances, num_grades)
        first_rank[0] = 0
        for distance in range(1, num_distances):
            first_rank[distance] = first_rank[distance - 1] + counts[q, distance - 1].sum()
        for rule in range(sums.shape[0]):
            if rule > 0 or not with_index:  # the seeded shuffle: the same keys, in the permuted order
                _compute_keys(query_words, shuffled, num_grades, keys)
            _rank_grades(keys, first_rank, num_grades, ranked, candidates)
            _ranking_sums(ranked, k, log2_positions, sums[rule, q], hits_so_far)
            for column in range(len(top_ns)):
                hits_at_top_n[rule, q, column] = hits_so_far[top_ns[column] - 1]
