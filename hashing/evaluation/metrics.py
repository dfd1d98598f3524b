"""Retrieval metrics by Hamming ranking.

Ranking rule (docs/METHOD.md §3.2): the database is ranked by Hamming distance to the query and ties
are broken by database index, so every figure is unique and independent of sort stability. An item is
relevant when it shares at least one label with the query.

Speed without a Q x N argsort or a loop over ranks: codes and labels come packed (hashing/codes.py), so a
distance is a popcount of an XOR and relevance a bitwise AND. Distances are small integers, so each
chunk of queries is ranked by numpy's stable radix sort on uint8/uint16 keys, and for K < N a per-row
histogram of distances finds the boundary distance first, so only about K candidates per query are
ranked. Chunks run on a few threads (numpy releases the GIL) and memory stays bounded by the chunk.
With numba installed, hashing/evaluation/fused.py does the whole pass in one compiled loop per query instead (distances,
(distance x shared labels) counts, a counting sort per tie rule; docs/PERFORMANCE.md), with identical figures;
this module's NumPy code is its fallback.

The other standard figures (docs/METHOD.md §3.4) reuse that pass: precision@top-N reads the same
ranking, and the precision-recall curve over Hamming radii and the precision within Hamming radius 2
need no ranking at all, only per-query histograms of the distances of all items and of the relevant
ones (the set "every item within radius r" is the same whatever the tie rule). retrieval_metrics()
computes all of them in one pass, with the same memory bound.

Conventions (docs/METHOD.md §3.5-§3.7, hashing/evaluation/conventions.py): the defaults are the paper's; any other
normalize / zero_hit / ties, and the graded metrics NDCG, ACG and WAP (rel = number of shared labels), come
from the same chunked pass, the grade of a ranked item being a popcount of an AND. ties="aware" ranks
nothing: it reads per-query counts of (distance, shared labels) pairs.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from hashing.evaluation import fused
from hashing.codes import CodeSet, count_dtype, hamming_distances, popcount_sum, word_columns
from hashing.evaluation.conventions import (TIES, Convention, database_permutation, every_convention, expected_hits,
                          precision_sums_of_ranking, ranked_statistics, shuffled_database, statistics_of_ranking_sums,
                          summarize, tie_aware_statistics)

# Elements (queries x database items, or per-query counts) per chunk: a few MB per working array, cache friendly.
_CHUNK_ELEMENTS = 1 << 20
# The graded metrics count, per query, the items of each (distance, shared labels) pair: (n + 1) x (G + 1)
# integers for n-bit codes and queries of up to G labels. Above this many a single query's counts (and the
# arrays of the tie-aware closed forms, of the same shape) would take gigabytes: such inputs are refused.
MAX_COUNTS_PER_QUERY = 1 << 24
# NDCG's gain 2^g - 1 of an item sharing g labels is a float64: finite up to g = 1023.
MAX_GRADE = 1023
# Queries per call of the fused kernel, whose memory is one database-sized key array per call plus per-query
# (distance x shared labels) counts: enough rows that the NumPy work on those counts is not per-query overhead.
_FUSED_ROWS = 64

# The paper's top-N precision curve (N = 100, 200, ..., 1000) and the usual table radius.
PAPER_TOP_NS = tuple(range(100, 1001, 100))
HAMMING_RADIUS = 2


def _relevance(query_label_words, db_label_words, columns):
    """rel[i, j] = query i shares a label with database item columns[i, j]."""
    relevant = None
    for q, d in zip(query_label_words, db_label_words):
        shared = (d[columns] & q[:, None]) != 0
        relevant = shared if relevant is None else relevant | shared
    return relevant


def rank_top_k(dist, k):
    """Column indices of the k best database items of each row, best first: (m, k).

    Order: Hamming distance, then database index. Only the items at or below each row's boundary
    distance (the distance of the k-th item) are sorted.
    """
    num_rows, num_items = dist.shape
    if k >= num_items:
        return np.argsort(dist, axis=1, kind="stable")
    num_values = int(dist.max()) + 1
    counts = np.stack([np.bincount(row, minlength=num_values) for row in dist])
    at_or_below = np.cumsum(counts, axis=1)
    boundary = np.count_nonzero(at_or_below < k, axis=1)
    rows = np.arange(num_rows)
    below = np.where(boundary > 0, at_or_below[rows, boundary - 1], 0)
    taken_from_boundary = k - below

    flat = np.flatnonzero(dist <= boundary[:, None].astype(dist.dtype))  # row-major: index order
    cand_row = flat // num_items
    cand_col = flat - cand_row * num_items
    cand_dist = dist.ravel()[flat]
    on_boundary = cand_dist == boundary[cand_row]
    # 1-based rank of each boundary item among its row's boundary items, in database-index order.
    running = np.cumsum(on_boundary)
    row_start = np.searchsorted(cand_row, rows)
    before_row = np.where(row_start > 0, running[row_start - 1], 0)
    boundary_rank = running - before_row[cand_row]
    keep = ~on_boundary | (boundary_rank <= taken_from_boundary[cand_row])

    kept_cols = cand_col[keep].reshape(num_rows, k)
    kept_dist = cand_dist[keep].reshape(num_rows, k)
    order = np.argsort(kept_dist, axis=1, kind="stable")
    return np.take_along_axis(kept_cols, order, axis=1)


def _average_precision_of_ranking(relevant):
    """AP of each row of a (m, k) relevance matrix in rank order; 0 for a row with no relevant item."""
    precision_sum, num_relevant = precision_sums_of_ranking(relevant)
    return np.where(num_relevant > 0, precision_sum / np.maximum(num_relevant, 1), 0.0)


def _distance_histograms(dist, query_labels, db_labels, hash_bit):
    """Per query, the number of database items at each Hamming distance 0..n and the number of relevant
    ones among them: two (m, n + 1) integer arrays, from one bincount per row of 2 * distance + relevant
    (small unsigned keys: half the passes of int64 keys with row offsets)."""
    # Indexing the database words with [None, :] relates every query to every item without a gather.
    relevant = _relevance(query_labels, db_labels, np.s_[None, :])
    keys = dist.astype(count_dtype(2 * hash_bit + 1))
    keys <<= 1
    keys |= relevant
    counts = np.stack([np.bincount(row, minlength=2 * (hash_bit + 1)) for row in keys])
    counts = counts.reshape(len(keys), hash_bit + 1, 2)
    return counts.sum(axis=2), counts[:, :, 1]


class _Problem(NamedTuple):
    """Word columns of the packed codes and labels of a CodeSet (hashing/codes.py), and its sizes."""
    query_codes: list
    query_labels: list
    db_codes: list
    db_labels: list
    num_queries: int
    num_items: int
    hash_bit: int
    db_label_patterns: list = None  # word columns of the distinct database label rows (graded metrics)
    pattern_counts: np.ndarray = None  # how many database items have each of them
    fused_query: tuple = None  # (codes, labels) as the fused kernel's (rows, words) matrices; None: NumPy path
    fused_database: tuple = None
    max_grade: int = 0  # the most labels a query has: every chunk counts shared labels 0..max_grade (same shapes)


def _problem(codes, label_patterns=False):
    """The packed problem of a CodeSet; label_patterns: for the graded metrics, which also need the distinct
    database label rows and at most MAX_COUNTS_PER_QUERY counts per query (ValueError beyond)."""
    if len(codes.query_bits) == 0 or len(codes.database_bits) == 0:
        raise ValueError("retrieval metrics need at least one query and one database item")
    query = word_columns(codes.query_bits), word_columns(codes.query_labels)
    database = word_columns(codes.database_bits), word_columns(codes.database_labels)
    max_grade = int(sum(np.bitwise_count(words).astype(np.int64) for words in query[1]).max())
    if label_patterns:
        _check_graded_size(codes.hash_bit, max_grade)
    fused_sides = (None, None)
    if fused.fits(codes.hash_bit, max_grade, len(codes.query_bits) * len(codes.database_bits)):
        fused_sides = (tuple(fused.packed_matrix(words).T.copy() for words in query),
                       tuple(fused.packed_matrix(words) for words in database))
    patterns, counts = _distinct_rows(database[1]) if label_patterns and fused_sides[0] is None else (None, None)
    return _Problem(*query, *database, len(codes.query_bits), len(codes.database_bits), codes.hash_bit, patterns,
                    counts, *fused_sides, max_grade)


def _check_graded_size(hash_bit, max_grade):
    if max_grade > MAX_GRADE:
        raise ValueError(f"a query has {max_grade} labels: NDCG's gain 2^g - 1 exceeds the floating-point range "
                         f"beyond {MAX_GRADE} shared labels")
    if (hash_bit + 1) * (max_grade + 1) > MAX_COUNTS_PER_QUERY:
        raise ValueError(f"{hash_bit}-bit codes and queries of up to {max_grade} labels need {hash_bit + 1} x "
                         f"{max_grade + 1} counts per query, more than the {MAX_COUNTS_PER_QUERY:,} the graded "
                         "metrics hold in memory at once")


def _rows_per_chunk(problem, per_row):
    """Queries per chunk: _CHUNK_ELEMENTS over what one query needs (its distances to every item, or `per_row`
    counts), at least one."""
    return max(1, _CHUNK_ELEMENTS // max(problem.num_items, per_row))


def _distinct_rows(words):
    """The distinct rows of word columns (as word columns) and how often each occurs; up to 64 classes the
    rows are single integers, which np.unique sorts far faster than rows."""
    if len(words) == 1:
        values, counts = np.unique(words[0], return_counts=True)
        return [values], counts
    rows, counts = np.unique(np.stack(words, axis=1), axis=0, return_counts=True)
    return [np.ascontiguousarray(rows[:, column]) for column in range(rows.shape[1])], counts


def _shared_labels(query_label_words, db_label_words, columns):
    """grade[i, j] = number of labels query i shares with database item columns[i, j] (codes.count_dtype of the
    labels' bit width: uint8 would wrap at 256 shared labels)."""
    largest = sum(8 * words.dtype.itemsize for words in query_label_words)
    return popcount_sum((d[columns] & q[:, None] for q, d in zip(query_label_words, db_label_words)), largest)


def _counts_by_distance_and_grade(dist, shared, hash_bit, max_grade):
    """(m, n + 1, G + 1): per query, the database items at each Hamming distance sharing g labels with it,
    from one bincount per row of the key distance * (G + 1) + grade."""
    num_bins = (hash_bit + 1) * (max_grade + 1)
    keys = dist.astype(count_dtype(num_bins - 1))
    keys *= max_grade + 1
    keys += shared
    counts = np.stack([np.bincount(row, minlength=num_bins) for row in keys])
    return counts.reshape(len(keys), hash_bit + 1, max_grade + 1)


def _grade_counts(query_labels, problem, max_grade):
    """(m, G + 1): database items sharing g labels with each query. They depend on the labels only, so they
    are counted over the distinct label rows of the database (a few hundred), weighted by their counts."""
    shared = _shared_labels(query_labels, problem.db_label_patterns, np.s_[None, :]).astype(np.int64)
    shared += np.arange(len(shared))[:, None] * (max_grade + 1)
    counts = np.bincount(shared.ravel(), weights=np.broadcast_to(problem.pattern_counts, shared.shape).ravel(),
                         minlength=len(shared) * (max_grade + 1))
    return counts.astype(np.int64).reshape(len(shared), max_grade + 1)


def _graded_chunk(dist, query_labels, problem, depths, ties):
    """The per-query figures of conventions.PER_QUERY_KEYS for one chunk (map_depth, top_ns = depths), plus
    hits_at_top_n and the distance histograms. ties="aware" makes no ranking: everything comes from the
    counts of (distance, shared labels) pairs; "index" ranks and reads the shared labels of the top K."""
    map_depth, top_ns = depths
    max_grade = problem.max_grade
    if ties == "aware":
        shared = _shared_labels(query_labels, problem.db_labels, np.s_[None, :])
        counts = _counts_by_distance_and_grade(dist, shared, problem.hash_bit, max_grade)
        items = counts.sum(axis=2)
        stats = {"items_at_distance": items, "relevant_at_distance": items - counts[:, :, 0]}
        stats.update(tie_aware_statistics(counts, map_depth))
        if top_ns:
            stats["hits_at_top_n"] = expected_hits(counts, top_ns)
        return stats
    ranked = rank_top_k(dist, max(map_depth, max(top_ns, default=0)))
    grades = _shared_labels(query_labels, problem.db_labels, ranked)
    stats = ranked_statistics(grades[:, :map_depth], _grade_counts(query_labels, problem, max_grade))
    if top_ns:
        stats["hits_at_top_n"] = np.cumsum(grades[:, :max(top_ns)] > 0, axis=1)[:, np.asarray(top_ns) - 1]
    return stats


def _per_query_statistics(problem, map_depth=0, top_ns=(), histograms=False, threads=None, graded=None):
    """One chunked pass over the queries. Returns a dict of per-query arrays, each present on request:
    average_precision (AP@map_depth), hits_at_top_n (relevant items among the first N, one column per N),
    items_at_distance and relevant_at_distance (the histograms of _distance_histograms).
    graded "index" or "aware" (the tie rule; "random" is "index" on a shuffled database) computes instead
    every convention's figures (conventions.PER_QUERY_KEYS), hits_at_top_n and the histograms."""
    if problem.fused_query is not None and not graded:
        return _fused_statistics(problem, (map_depth, top_ns), ("index",), 0, threads, graded=False,
                                 histograms=histograms)["index"]
    rank_depth = max(map_depth, max(top_ns, default=0))
    per_row = (problem.hash_bit + 1) * ((problem.max_grade + 1) if graded else 2)
    rows_per_chunk = _rows_per_chunk(problem, per_row if graded or histograms else 0)

    def chunk(start):
        part = slice(start, start + rows_per_chunk)
        query_labels = [w[part] for w in problem.query_labels]
        dist = hamming_distances([w[part] for w in problem.query_codes], problem.db_codes, problem.hash_bit)
        if graded:
            stats = _graded_chunk(dist, query_labels, problem, (map_depth, top_ns), graded)
            if not histograms:  # (queries x (n + 1)) arrays: kept only when asked for
                stats.pop("items_at_distance", None), stats.pop("relevant_at_distance", None)
            elif "items_at_distance" not in stats:
                stats["items_at_distance"], stats["relevant_at_distance"] = _distance_histograms(
                    dist, query_labels, problem.db_labels, problem.hash_bit)
            return stats
        stats = {}
        if rank_depth:
            ranked = rank_top_k(dist, rank_depth)
            relevant = _relevance(query_labels, problem.db_labels, ranked)
            if map_depth:
                stats["average_precision"] = _average_precision_of_ranking(relevant[:, :map_depth])
            if top_ns:
                hits = np.cumsum(relevant[:, :max(top_ns)], axis=1)
                stats["hits_at_top_n"] = hits[:, np.asarray(top_ns) - 1]
        if histograms:
            stats["items_at_distance"], stats["relevant_at_distance"] = _distance_histograms(
                dist, query_labels, problem.db_labels, problem.hash_bit)
        return stats

    return _concatenate(_map_chunks(chunk, range(0, problem.num_queries, rows_per_chunk), threads))


def _map_chunks(chunk, starts, threads):
    """chunk(start) for every start, on a few threads (NumPy and the fused kernel release the GIL)."""
    threads = threads or min(4, os.cpu_count() or 1)
    if threads == 1 or len(starts) == 1:
        return [chunk(s) for s in starts]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(chunk, starts))


def _concatenate(parts):
    """Per-chunk dicts of per-query arrays (or of such dicts) -> one dict of arrays over all queries."""
    if isinstance(parts[0], dict):
        return {name: _concatenate([part[name] for part in parts]) for name in parts[0]}
    return np.concatenate(parts)


def _fused_statistics(problem, depths, rules, seed, threads, graded, histograms):
    """_per_query_statistics by the fused kernel (hashing/evaluation/fused.py) for every tie rule of `rules` in one pass:
    {rule: stats}. Each stats has the distance histograms when `histograms`; graded: conventions.PER_QUERY_KEYS
    (+ hits_at_top_n), else average_precision (when map_depth) and hits_at_top_n (when top_ns)."""
    map_depth, top_ns = depths
    ranked_rules = [rule for rule in ("index", "random") if rule in rules]
    # ties="random" ranks the database permuted once up front by index (conventions.shuffled_database)
    order = database_permutation(problem.num_items, seed) if "random" in rules else np.zeros(0, dtype=np.int64)
    shuffled = tuple(np.ascontiguousarray(matrix[:, order]) for matrix in problem.fused_database)
    kernel_depths = (map_depth, np.asarray(top_ns, dtype=np.int64), "index" in rules) if ranked_rules else \
        (0, np.zeros(0, dtype=np.int64), False)
    # The DCG discounts from NumPy's log2, as the NumPy path divides by, so both paths agree to the last bit.
    log2_positions = np.log2(np.arange(2, max(map_depth, max(top_ns, default=0)) + 2))

    def chunk(start):
        query = tuple(matrix[start:start + _FUSED_ROWS] for matrix in problem.fused_query)
        counts = np.zeros((len(query[0]), problem.hash_bit + 1, problem.max_grade + 1), dtype=np.int64)
        sums = np.zeros((len(ranked_rules), len(query[0]), len(fused.SUM_COLUMNS)))
        hits_at_top_n = np.zeros((len(ranked_rules), len(query[0]), len(kernel_depths[1])), dtype=np.int64)
        fused.rank_chunk(query, (problem.fused_database, shuffled), kernel_depths, log2_positions,
                         (counts, sums, hits_at_top_n))
        items = counts.sum(axis=2)
        kept = {"items_at_distance": items, "relevant_at_distance": items - counts[:, :, 0]} if histograms else {}
        by_rule = {rule: {**kept, **_ranked_rule_statistics(sums[i], hits_at_top_n[i], counts, depths, graded)}
                   for i, rule in enumerate(ranked_rules)}
        if "aware" in rules:
            by_rule["aware"] = {**kept, **tie_aware_statistics(counts, map_depth)}
            if top_ns:
                by_rule["aware"]["hits_at_top_n"] = expected_hits(counts, top_ns)
        return by_rule

    return _concatenate(_map_chunks(chunk, range(0, problem.num_queries, _FUSED_ROWS), threads))


def _ranked_rule_statistics(sums, hits_at_top_n, counts, depths, graded):
    """The per-query arrays of one ranked tie rule from the kernel's sums (see _fused_statistics)."""
    map_depth, top_ns = depths
    stats = {"hits_at_top_n": hits_at_top_n} if top_ns else {}
    named = dict(zip(fused.SUM_COLUMNS, sums.T))
    if graded:
        stats.update(statistics_of_ranking_sums(named, counts.sum(axis=1), map_depth))
    elif map_depth:
        hits = named["hits"]
        stats["average_precision"] = np.where(hits > 0, named["precision_sum"] / np.maximum(hits, 1), 0.0)
    return stats


def _map_depth(topk, num_items):
    return num_items if topk is None or topk <= 0 else min(int(topk), num_items)


def check_top_ns(top_ns, num_items):
    top_ns = [int(n) for n in top_ns]
    if not top_ns or min(top_ns) < 1 or max(top_ns) > num_items:
        raise ValueError(f"every N of precision@top-N must be between 1 and the database size {num_items}, "
                         f"got {top_ns}")
    return top_ns


def _check_radius(radius, hash_bit):
    if not 0 <= radius <= hash_bit:
        raise ValueError(f"the Hamming radius must be between 0 and the code length {hash_bit}, got {radius}")
    return int(radius)


def default_top_ns(num_items):
    """The paper's N = 100, 200, ..., 1000; ten even steps up to the database size when it is smaller."""
    if num_items >= PAPER_TOP_NS[-1]:
        return list(PAPER_TOP_NS)
    return sorted({max(1, round(num_items * step / 10)) for step in range(1, 11)})


class RadiusCurves(NamedTuple):
    """Retrieval of every item within Hamming radius r, for r = 0..n (arrays of length n + 1).

    precision: mean over the queries that retrieve at least one item within r (the precision of an empty
        set is undefined); NaN where no query retrieves anything.
    recall: mean over the queries that have at least one relevant database item (the others have no
        recall); 1 at r = n. NaN when no query has a relevant item.
    retrieving: fraction of the queries that retrieve at least one item within r.
    precision_empty_as_zero: mean over all queries, an empty retrieval counting as precision 0 (the
        convention of precision within Hamming radius 2). It equals precision * retrieving.
    """
    precision: np.ndarray
    recall: np.ndarray
    retrieving: np.ndarray
    precision_empty_as_zero: np.ndarray


def _radius_curves(items_at_distance, relevant_at_distance):
    retrieved = np.cumsum(items_at_distance, axis=1)
    relevant = np.cumsum(relevant_at_distance, axis=1)
    num_queries, num_radii = retrieved.shape
    precision = np.divide(relevant, retrieved, out=np.zeros(retrieved.shape), where=retrieved > 0)
    retrieving = np.count_nonzero(retrieved, axis=0)
    total_relevant = relevant[:, -1]
    with_relevant = total_relevant > 0
    recall = (relevant[with_relevant] / total_relevant[with_relevant, None]).mean(axis=0) \
        if with_relevant.any() else np.full(num_radii, np.nan)
    return RadiusCurves(
        precision=np.divide(precision.sum(axis=0), retrieving, out=np.full(num_radii, np.nan), where=retrieving > 0),
        recall=recall,
        retrieving=retrieving / num_queries,
        precision_empty_as_zero=precision.mean(axis=0))


def _problem_of_arrays(query_codes, query_labels, db_codes, db_labels):
    return _problem(CodeSet.from_outputs(query_codes, query_labels, db_codes, db_labels))


def average_precisions(query_codes, query_labels, db_codes, db_labels, topk=None, threads=None):
    """AP@K of every query (docs/METHOD.md §3.3), as a float64 array of length Q.

    Codes are real-valued or +-1 (binarised with sign, 0 -> +1); labels are multi-hot. topk <= 0 or
    None means the whole database; a topk above the database size is clamped to it.
    """
    return average_precisions_of_codes(_problem_of_arrays(query_codes, query_labels, db_codes, db_labels), topk,
                                       threads)


def average_precisions_of_codes(codes, topk=None, threads=None):
    """average_precisions() of a CodeSet, or of the packed problem made from one."""
    problem = codes if isinstance(codes, _Problem) else _problem(codes)
    k = _map_depth(topk, problem.num_items)
    return _per_query_statistics(problem, map_depth=k, threads=threads)["average_precision"]


def _convention_statistics(codes, k, convention, top_ns=(), threads=None, histograms=False):
    """Per-query figures of every metric under the convention's tie rule, in one pass (a CodeSet)."""
    return _statistics_by_tie_rule(codes, (k, top_ns), (convention.ties,), convention.seed, threads,
                                   histograms)[convention.ties]


def _statistics_by_tie_rule(codes, depths, rules, seed=0, threads=None, histograms=False):
    """Per-query figures of every metric (conventions.PER_QUERY_KEYS, hits_at_top_n when top_ns, the distance
    histograms on request) under each tie rule of `rules`, as {rule: dict}, for depths (K, top_ns). The fused
    kernel serves every rule from one pass (one distance and histogram computation, one counting sort per ranked
    rule); NumPy makes one pass per rule, "random" being "index" on the seeded shuffle of the database."""
    problem = _problem(codes, label_patterns=True)
    if problem.fused_query is not None:
        return _fused_statistics(problem, depths, rules, seed, threads, graded=True, histograms=histograms)
    by_rule = {}
    for rule in rules:
        rule_problem = _problem(shuffled_database(codes, seed), label_patterns=True) if rule == "random" else problem
        by_rule[rule] = _per_query_statistics(rule_problem, *depths, histograms=histograms, threads=threads,
                                              graded="aware" if rule == "aware" else "index")
    return by_rule


def ranking_metrics_of_codes(codes, topk=None, convention=Convention(), threads=None):
    """mAP, WAP, NDCG and ACG @K of a CodeSet under a Convention (docs/METHOD.md §3.5-§3.7), as a dict:
    map, wap, ndcg, acg, skipped_queries (left out of mAP and WAP under zero_hit="skip"),
    ndcg_skipped_queries, map_topk."""
    k = _map_depth(topk, len(codes.database_bits))
    figures = summarize(_convention_statistics(codes, k, convention, threads=threads), convention)
    return {**figures, "map_topk": k}


def convention_table(codes, topk=None, seed=0, threads=None):
    """ranking_metrics_of_codes() under every convention (conventions.every_convention), from one pass (fused
    kernel; NumPy: one pass per tie rule): a list of dicts with the convention's normalize, zero_hit and ties added."""
    k = _map_depth(topk, len(codes.database_bits))
    per_query = _statistics_by_tie_rule(codes, (k, ()), TIES, seed, threads)
    return [{**convention.as_dict(), **summarize(per_query[convention.ties], convention), "map_topk": k}
            for convention in every_convention(seed)]


def _ranking_metric(name, arrays, topk, convention):
    codes = CodeSet.from_outputs(*arrays)
    return ranking_metrics_of_codes(codes, topk, convention)[name]


def map_at_k(query_codes, query_labels, db_codes, db_labels, topk=None, normalize="hits", zero_hit="zero",
             ties="index", seed=0):
    """mAP@K by Hamming ranking (see average_precisions); the defaults are the paper's convention (AP over the
    hits in the top K, a query without one counts 0, ties by database index). Other conventions: Convention."""
    convention = Convention(normalize, zero_hit, ties, seed)
    if convention.is_default:
        return float(np.mean(average_precisions(query_codes, query_labels, db_codes, db_labels, topk)))
    return _ranking_metric("map", (query_codes, query_labels, db_codes, db_labels), topk, convention)


def ndcg_at_k(query_codes, query_labels, db_codes, db_labels, topk=None, normalize="hits", zero_hit="zero",
              ties="index", seed=0):
    """Mean NDCG@K, gain 2^rel - 1 with rel = shared labels (docs/METHOD.md §3.6); normalize does not apply."""
    return _ranking_metric("ndcg", (query_codes, query_labels, db_codes, db_labels), topk,
                           Convention(normalize, zero_hit, ties, seed))


def acg_at_k(query_codes, query_labels, db_codes, db_labels, topk=None, normalize="hits", zero_hit="zero",
             ties="index", seed=0):
    """Mean ACG@K, the mean number of shared labels of the top K (docs/METHOD.md §3.6); normalize and zero_hit
    do not apply (it divides by K)."""
    return _ranking_metric("acg", (query_codes, query_labels, db_codes, db_labels), topk,
                           Convention(normalize, zero_hit, ties, seed))


def wap_at_k(query_codes, query_labels, db_codes, db_labels, topk=None, normalize="hits", zero_hit="zero",
             ties="index", seed=0):
    """Mean weighted AP@K: ACG@t summed over the relevant positions t <= K, over AP's denominator
    (docs/METHOD.md §3.6)."""
    return _ranking_metric("wap", (query_codes, query_labels, db_codes, db_labels), topk,
                           Convention(normalize, zero_hit, ties, seed))


def map_of_codes(codes, topk=None, convention=Convention()):
    """map_at_k() of a CodeSet (hashing/codes.py)."""
    if convention.is_default:
        return float(np.mean(average_precisions_of_codes(codes, topk)))
    return ranking_metrics_of_codes(codes, topk, convention)["map"]


def map_by_bits(codes, lengths, topk=None, convention=Convention(), whole_map=None):
    """{str(b): map_of_codes of the first b bits of every code} for each prefix length b (nested codes,
    docs/METHOD.md §14); JSON-ready keys. `whole_map`, the whole codes' mAP when the caller has it already, is
    taken for the length of the whole code instead of being computed again."""
    return {str(bits): whole_map if whole_map is not None and bits == codes.hash_bit
            else map_of_codes(codes.prefix(bits), topk, convention) for bits in lengths}


def precision_at_top_n(query_codes, query_labels, db_codes, db_labels, top_ns=PAPER_TOP_NS, threads=None):
    """Mean precision@N for each N in top_ns (float64 array, same order).

    precision@N of a query = relevant items among its first N in the ranking (Hamming distance, then
    database index) / N. Every N must lie in 1..database size (ValueError otherwise: beyond it the
    "first N" do not exist). A query with no relevant item scores 0, as in mAP.
    """
    problem = _problem_of_arrays(query_codes, query_labels, db_codes, db_labels)
    top_ns = check_top_ns(top_ns, problem.num_items)
    hits = _per_query_statistics(problem, top_ns=top_ns, threads=threads)["hits_at_top_n"]
    return hits.mean(axis=0) / np.asarray(top_ns)


def _radius_curves_of(problem, threads):
    stats = _per_query_statistics(problem, histograms=True, threads=threads)
    return _radius_curves(stats["items_at_distance"], stats["relevant_at_distance"])


def precision_recall_curve(query_codes, query_labels, db_codes, db_labels, threads=None):
    """Precision and recall of retrieving every item within Hamming radius r, r = 0..n: RadiusCurves.

    The retrieved set within a radius does not depend on how ties are ordered; see RadiusCurves for
    how queries that retrieve nothing, or have no relevant item, are averaged.
    """
    return _radius_curves_of(_problem_of_arrays(query_codes, query_labels, db_codes, db_labels), threads)


def precision_within_radius(query_codes, query_labels, db_codes, db_labels, radius=HAMMING_RADIUS, threads=None):
    """Mean precision of retrieving every item within Hamming radius `radius` (default 2).

    A query that retrieves nothing within the radius scores 0, as in HashNet's and DCH's evaluation: with
    long codes the Hamming ball empties, and the figure is meant to show it. The mean is over all queries.
    """
    problem = _problem_of_arrays(query_codes, query_labels, db_codes, db_labels)
    radius = _check_radius(radius, problem.hash_bit)
    return float(_radius_curves_of(problem, threads).precision_empty_as_zero[radius])


def _json_floats(values):
    """A list of floats with NaN (undefined) as None, so the JSON file stays standard."""
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def retrieval_metrics(query_codes, query_labels, db_codes, db_labels, topk=None, top_ns=None,
                      radius=HAMMING_RADIUS, threads=None, convention=Convention()):
    """Every metric above in one pass over the distances, as a JSON-ready dict:

    map, map_topk; precision_at_top_n {n, precision} (top_ns None: default_top_ns of the database size);
    precision_recall {radius, precision, recall, retrieving} over radii 0..n (RadiusCurves; undefined
    values are None); precision_within_radius {radius, precision, retrieving}; sizes and code length.
    """
    return metrics_of_codes(CodeSet.from_outputs(query_codes, query_labels, db_codes, db_labels), topk, top_ns,
                            radius, threads, convention)


def metrics_of_codes(codes, topk=None, top_ns=None, radius=HAMMING_RADIUS, threads=None, convention=Convention(),
                     train_counts=None):
    """retrieval_metrics() of a CodeSet (hashing/codes.py): the packed codes are used as they are. Besides the
    paper's figures: the convention, wap, ndcg, acg and the queries left out under zero_hit="skip". mAP and
    precision@top-N follow the convention's tie rule (ties="aware": their expectation over tie orders). With the
    training set's per-class label counts, also its long_tail_breakdown() under "long_tail"."""
    problem = _problem(codes)
    k = _map_depth(topk, problem.num_items)
    top_ns = check_top_ns(default_top_ns(problem.num_items) if top_ns is None else top_ns, problem.num_items)
    radius = _check_radius(radius, problem.hash_bit)
    stats = _convention_statistics(codes, k, convention, top_ns, threads, histograms=True)
    figures = summarize(stats, convention)
    curves = _radius_curves(stats["items_at_distance"], stats["relevant_at_distance"])
    metrics = {
        "num_queries": problem.num_queries,
        "num_database": problem.num_items,
        "hash_bit": problem.hash_bit,
        "map": figures["map"],
        "map_topk": k,
        "convention": convention.as_dict(),
        "skipped_queries": figures["skipped_queries"],
        "wap": figures["wap"],
        "ndcg": figures["ndcg"],
        "ndcg_skipped_queries": figures["ndcg_skipped_queries"],
        "acg": figures["acg"],
        "precision_at_top_n": {"n": top_ns,
                               "precision": _json_floats(stats["hits_at_top_n"].mean(axis=0) / np.asarray(top_ns))},
        "precision_recall": {"radius": list(range(problem.hash_bit + 1)),
                             "precision": _json_floats(curves.precision),
                             "recall": _json_floats(curves.recall),
                             "retrieving": _json_floats(curves.retrieving)},
        "precision_within_radius": {"radius": radius,
                                    "precision": float(curves.precision_empty_as_zero[radius]),
                                    "retrieving": float(curves.retrieving[radius])},
    }
    if train_counts is not None:
        metrics["long_tail"] = long_tail_breakdown(stats[f"ap_{convention.normalize}"], codes.query_label_matrix(),
                                                   train_counts)
    return metrics


# ============ long-tail breakdown (docs/METHOD.md §9.2) ============

BUCKETS = ("head", "medium", "tail")


def frequency_buckets(train_counts):
    """{head, medium, tail: class indices}: the classes ranked by training frequency (commonest first,
    ties by class index), the first and the last floor(C/3) being head and tail, the rest medium."""
    counts = np.asarray(train_counts)
    ranked = np.lexsort((np.arange(len(counts)), -counts))
    third = len(counts) // 3
    parts = (ranked[:third], ranked[third:len(counts) - third], ranked[len(counts) - third:])
    return {name: sorted(int(c) for c in part) for name, part in zip(BUCKETS, parts)}


def per_class_average_precision(average_precisions, query_labels):
    """(C,) mean AP over the queries holding each class; NaN for a class no query holds."""
    holds = np.asarray(query_labels) > 0
    count = holds.sum(axis=0)
    total = np.asarray(average_precisions, dtype=np.float64) @ holds
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def long_tail_breakdown(average_precisions, query_labels, train_counts):
    """Per-class AP (with each class's training count and number of queries) and, per frequency bucket,
    its classes and their mean class AP (classes without queries left out), as a JSON-ready dict."""
    class_ap = per_class_average_precision(average_precisions, query_labels)
    buckets = {}
    for name, classes in frequency_buckets(train_counts).items():
        values = class_ap[classes] if classes else np.array([])
        values = values[~np.isnan(values)]
        buckets[name] = {"classes": classes, "map": float(values.mean()) if len(values) else None}
    return {"per_class": {"ap": _json_floats(class_ap), "train_count": [int(c) for c in train_counts],
                          "num_queries": [int(n) for n in (np.asarray(query_labels) > 0).sum(axis=0)]},
            "buckets": buckets}
