"""Conventions of the ranking metrics and the per-query figures behind them (docs/METHOD.md §3.5-§3.7).

mAP in deep hashing is not one number: what AP divides by (`normalize`), whether a query without a
relevant item counts as 0 or leaves the mean (`zero_hit`), and how items at equal Hamming distance are
ordered (`ties`) all move it. A Convention names the three choices; the paper's (hits, zero, index) is
the default.

The figures of one chunk of queries come from one of two inputs:

- a ranking (ties `index`, or `random` = `index` on a database shuffled once by a seeded permutation):
  the number of labels each of the first K items shares with the query, in rank order
  (`ranked_statistics`);
- under ties `aware` no ranking at all: per query, the items of each Hamming distance counted by the
  number of labels they share with the query (`tie_aware_statistics`), from which the exact expectation
  over all orders of equal-distance items follows in closed form (docs/METHOD.md §3.7).

Both return the same per-query arrays (`PER_QUERY_KEYS`), which `summarize` averages under a Convention.
"""
import functools
from dataclasses import dataclass

import numpy as np

NORMALIZE = ("hits", "min", "relevant")
ZERO_HIT = ("zero", "skip")
TIES = ("index", "aware", "random")


@dataclass(frozen=True)
class Convention:
    """How a ranking metric is computed: AP's denominator, queries with a zero denominator, tie order.

    seed: the seed of the database permutation used by ties="random" (ignored otherwise).
    """
    normalize: str = "hits"
    zero_hit: str = "zero"
    ties: str = "index"
    seed: int = 0

    def __post_init__(self):
        for name, allowed in (("normalize", NORMALIZE), ("zero_hit", ZERO_HIT), ("ties", TIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def is_default(self):
        return (self.normalize, self.zero_hit, self.ties) == ("hits", "zero", "index")

    def describe(self):
        """'' for the paper's convention, else e.g. 'normalize=min, ties=aware' (the non-default choices)."""
        parts = [f"{name}={getattr(self, name)}" for name, default in
                 (("normalize", "hits"), ("zero_hit", "zero"), ("ties", "index")) if getattr(self, name) != default]
        if self.ties == "random":
            parts.append(f"seed={self.seed}")
        return ", ".join(parts)

    def as_dict(self):
        return {"normalize": self.normalize, "zero_hit": self.zero_hit, "ties": self.ties, "seed": self.seed}


def every_convention(seed=0):
    """All 18 combinations, ties rule outermost (one pass over the data per rule)."""
    return [Convention(normalize, zero_hit, ties, seed)
            for ties in TIES for normalize in NORMALIZE for zero_hit in ZERO_HIT]


def database_permutation(num_items, seed):
    """The seeded tie order of ties="random": item order[j] comes j-th among items at equal distance."""
    return np.random.default_rng(seed).permutation(num_items)


def shuffled_database(codes, seed):
    """The CodeSet with its database in a seeded random order: ranking it with index tie-breaking ranks
    the original database with a random tie order, one permutation shared by every query."""
    order = database_permutation(len(codes.database_bits), seed)
    return type(codes)(codes.query_bits, codes.query_labels, codes.database_bits[order], codes.database_labels[order],
                       codes.hash_bit, codes.num_classes)


# ---------- helpers shared by both inputs ----------

@functools.lru_cache(maxsize=4)  # the same length for every chunk of queries: computed once (read-only)
def _harmonic(length):
    """H[t] = sum_{i <= t} 1/i for t = 0..length."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, length + 1))])


@functools.lru_cache(maxsize=4)
def _log2_discount_sums(length):
    """L[t] = sum_{i <= t} 1/log2(i + 1) for t = 0..length (the DCG discounts of positions 1..t)."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, length + 2)))])


def _gains(max_grade):
    """2^g - 1 for g = 0..max_grade (the NDCG gain of an item sharing g labels) as float64: exact up to g = 53,
    correctly rounded to g = 1023 (int64 shifts would wrap from g = 63)."""
    return np.ldexp(1.0, np.arange(max_grade + 1)) - 1.0


def ideal_dcg(grade_counts, k):
    """DCG@k of the ideal ordering: the whole database sorted by shared labels, best first.

    grade_counts: (m, G + 1) number of database items sharing g labels with each query.
    """
    max_grade = grade_counts.shape[1] - 1
    discounts = _log2_discount_sums(k)
    better = np.cumsum(grade_counts[:, ::-1], axis=1)[:, ::-1] - grade_counts  # items with a higher grade
    start, end = np.minimum(better, k), np.minimum(better + grade_counts, k)
    return ((discounts[end] - discounts[start]) * _gains(max_grade)).sum(axis=1)


def _safe_ratio(numerator, denominator):
    return np.divide(numerator, denominator, out=np.zeros(np.shape(numerator)), where=denominator > 0)


def _per_query(precision_sums, weighted_sums, denominators, defined, dcg, idcg, acg):
    """The per-query arrays every input produces (PER_QUERY_KEYS); the *_sums are dicts by normalize,
    or single arrays divided by the denominators here."""
    stats = {"ndcg": _safe_ratio(dcg, idcg), "ndcg_defined": idcg > 0, "acg": acg}
    for normalize in NORMALIZE:
        stats[f"ap_{normalize}"] = precision_sums[normalize] if denominators is None else \
            _safe_ratio(precision_sums, denominators[normalize])
        stats[f"wap_{normalize}"] = weighted_sums[normalize] if denominators is None else \
            _safe_ratio(weighted_sums, denominators[normalize])
        stats[f"defined_{normalize}"] = defined[normalize]
    return stats


PER_QUERY_KEYS = ("ndcg", "ndcg_defined", "acg") + tuple(
    f"{kind}_{normalize}" for normalize in NORMALIZE for kind in ("ap", "wap", "defined"))


# ---------- a ranking (ties index / random) ----------

class _Hits:
    """The relevant entries of a (m, k) rank-order matrix (grades or relevance): row, 1-based rank and value of
    each, in row-major order, the count per row, and for each entry the number of entries of earlier rows."""

    def __init__(self, ranked):
        num_rows, k = ranked.shape
        flat = np.flatnonzero(ranked)
        self.row = flat // k
        self.rank = flat - self.row * k + 1
        self.value = ranked.ravel()[flat]
        self.per_row = np.bincount(self.row, minlength=num_rows)
        self.earlier = np.repeat(np.cumsum(self.per_row) - self.per_row, self.per_row)

    def row_sums(self, weights):
        return np.bincount(self.row, weights=weights, minlength=len(self.per_row))

    def precision_sums(self):
        """Sum over the relevant ranks t of precision@t, per row."""
        return self.row_sums((np.arange(1, len(self.row) + 1) - self.earlier) / self.rank)


def precision_sums_of_ranking(relevant):
    """(sum over the relevant ranks t of precision@t, number of relevant items) of each row of a (m, k)
    relevance matrix in rank order, visiting only the relevant entries."""
    hits = _Hits(relevant)
    return hits.precision_sums(), hits.per_row


def ranked_statistics(grades, grade_counts):
    """Per-query figures of a ranking (docs/METHOD.md §3.5, §3.6).

    grades: (m, k) labels shared with the query by the first k items, in rank order.
    grade_counts: (m, G + 1) items of the whole database sharing g labels (for R and the ideal DCG).
    Irrelevant items add nothing to any numerator, so only the relevant entries are visited.
    """
    hits = _Hits(grades)
    grade_so_far = np.cumsum(hits.value, dtype=np.int64)
    grade_so_far -= np.concatenate([[0], grade_so_far])[hits.earlier]
    sums = {"precision_sum": hits.precision_sums(), "hits": hits.per_row,
            "weighted_sum": hits.row_sums(grade_so_far / hits.rank),
            "dcg": hits.row_sums(_gains(int(hits.value.max(initial=0)))[hits.value] / np.log2(hits.rank + 1)),
            "grade_sum": grades.sum(axis=1)}
    return statistics_of_ranking_sums(sums, grade_counts, grades.shape[1])


def statistics_of_ranking_sums(sums, grade_counts, k):
    """Per-query figures from the sums over the first k ranks (hashing/fused.SUM_COLUMNS, each summed in rank
    order): precision_sum and weighted_sum (over the relevant ranks t of precision@t and of the shared labels of
    ranks <= t over t), hits, dcg and grade_sum (the shared labels of the first k)."""
    total_relevant = grade_counts[:, 1:].sum(axis=1)
    denominators = {"hits": sums["hits"], "min": np.minimum(total_relevant, k), "relevant": total_relevant}
    defined = {normalize: denominator > 0 for normalize, denominator in denominators.items()}
    return _per_query(sums["precision_sum"], sums["weighted_sum"], denominators, defined, sums["dcg"],
                      ideal_dcg(grade_counts, k), sums["grade_sum"] / k)


# ---------- the expectation over tie orders (ties aware) ----------

def _bucket_precision_sums(harmonic, start, taken, size, relevant, before, grade_sum):
    """E[sum_{i=1..taken} rel_i * (before + grades at bucket positions 1..i) / (start + i)] over the orders of
    one bucket of equal-distance items (docs/METHOD.md §3.7): `size` items, `relevant` of them relevant with
    grades summing to grade_sum, after `start` items whose relevant items count (or whose grades sum to)
    `before`. Position i's term is A + B (i - 1), so the sum is closed: (A - B (start + 1)) (H[start + taken]
    - H[start]) + B taken, with H the harmonic numbers."""
    size_or_one = np.maximum(size, 1)
    first = relevant / size_or_one * before + grade_sum / size_or_one
    step = np.where(size > 1, grade_sum * (relevant - 1) / (size_or_one * np.maximum(size - 1, 1)), 0.0)
    return (first - step * (start + 1)) * (harmonic[start + taken] - harmonic[start]) + step * taken


@functools.lru_cache(maxsize=4)
def _log_factorials(length):
    """log(t!) for t = 0..length."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, length + 1)))])


def _log_binomial(log_factorials, n, k):
    return log_factorials[n] - log_factorials[k] - log_factorials[n - k]


def _hits_normalized(harmonic, buckets, k, above_sums):
    """E[precision sum / hits in the top k] for AP and WAP (normalize="hits"), exactly: only the bucket that
    holds position k makes the hits random (hypergeometric); the buckets above it are independent of it.
    Returns (ap, wap, defined)."""
    start, items, relevant, relevant_before, grade_sum, grade_before = buckets
    rows = np.arange(len(start))
    boundary = np.count_nonzero(start + items < k, axis=1)  # the bucket holding position k
    at = (rows, boundary)
    s, size, rel, hits_before = start[at], items[at], relevant[at], relevant_before[at]
    taken = k - s
    lowest, highest = np.maximum(0, taken - (size - rel)), np.minimum(rel, taken)
    lengths = highest - lowest + 1
    row_of = np.repeat(rows, lengths)
    x = lowest[row_of] + np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    log_factorials = _log_factorials(int(start[:, -1].max() + items[:, -1].max()))  # the database size
    size_r, rel_r, taken_r = size[row_of], rel[row_of], taken[row_of]
    probability = np.exp(_log_binomial(log_factorials, rel_r, x) + _log_binomial(log_factorials, size_r - rel_r,
                                                                                 taken_r - x)
                         - _log_binomial(log_factorials, size_r, taken_r))
    inverse_hits = _safe_ratio(np.ones(len(x)), hits_before[row_of] + x) * probability
    mean_grade = _safe_ratio(grade_sum[at], rel)[row_of]
    boundary_ap = _bucket_precision_sums(harmonic, s[row_of], taken_r, taken_r, x, hits_before[row_of], x)
    boundary_wap = _bucket_precision_sums(harmonic, s[row_of], taken_r, taken_r, x, grade_before[at][row_of],
                                          x * mean_grade)
    expected_inverse = np.bincount(row_of, inverse_hits, len(rows))
    above = np.arange(start.shape[1]) < boundary[:, None]
    results = [(sums * above).sum(axis=1) * expected_inverse + np.bincount(row_of, part * inverse_hits, len(rows))
               for sums, part in zip(above_sums, (boundary_ap, boundary_wap))]
    return results[0], results[1], hits_before + highest > 0


def expected_hits(counts_by_grade, depths):
    """E[relevant items among the first N] for each N of depths under random tie order: (m, len(depths))."""
    items = counts_by_grade.sum(axis=2)
    relevant = items - counts_by_grade[:, :, 0]
    start = np.cumsum(items, axis=1) - items
    share = _safe_ratio(relevant, items)
    return np.stack([(np.clip(n - start, 0, items) * share).sum(axis=1) for n in depths], axis=1)


def tie_aware_statistics(counts_by_grade, k):
    """Per-query figures as exact expectations over every order of equal-distance items (docs/METHOD.md §3.7).

    counts_by_grade: (m, n + 1, G + 1) database items at Hamming distance d sharing g labels with the query.
    """
    items = counts_by_grade.sum(axis=2)
    relevant = items - counts_by_grade[:, :, 0]
    max_grade = counts_by_grade.shape[2] - 1
    grade_sum = counts_by_grade @ np.arange(max_grade + 1)
    gain_sum = counts_by_grade @ _gains(max_grade)
    start = np.cumsum(items, axis=1) - items
    taken = np.clip(k - start, 0, items)
    relevant_before = np.cumsum(relevant, axis=1) - relevant
    grade_before = np.cumsum(grade_sum, axis=1) - grade_sum
    harmonic = _harmonic(int(items.sum(axis=1).max()))
    ap_terms = _bucket_precision_sums(harmonic, start, taken, items, relevant, relevant_before, relevant)
    wap_terms = _bucket_precision_sums(harmonic, start, taken, items, relevant, grade_before, grade_sum)
    grade_counts = counts_by_grade.sum(axis=1)
    total_relevant = grade_counts[:, 1:].sum(axis=1)
    constant = {"min": np.minimum(total_relevant, k), "relevant": total_relevant}
    buckets = (start, items, relevant, relevant_before, grade_sum, grade_before)
    ap_hits, wap_hits, defined_hits = _hits_normalized(harmonic, buckets, k, (ap_terms, wap_terms))
    ap = {"hits": ap_hits, **{name: _safe_ratio(ap_terms.sum(axis=1), den) for name, den in constant.items()}}
    wap = {"hits": wap_hits, **{name: _safe_ratio(wap_terms.sum(axis=1), den) for name, den in constant.items()}}
    defined = {"hits": defined_hits, **{name: den > 0 for name, den in constant.items()}}
    discounts = _log2_discount_sums(len(harmonic) - 1)
    dcg = (_safe_ratio(gain_sum, items) * (discounts[start + taken] - discounts[start])).sum(axis=1)
    acg = (_safe_ratio(grade_sum, items) * taken).sum(axis=1) / k
    return _per_query(ap, wap, None, defined, dcg, ideal_dcg(grade_counts, k), acg)


# ---------- the mean over queries ----------

def summarize(per_query, convention):
    """mAP, WAP, NDCG and ACG (means over queries) under a convention, and how many queries left the mean.

    zero_hit="skip" leaves out of mAP and WAP the queries whose AP denominator is 0 (under ties="aware": 0 in
    every tie order), and out of NDCG those with no relevant item in the database (ideal DCG 0); ACG divides
    by K, never 0, so it always averages every query. A mean over no query is 0.
    """
    def mean(values, keep):
        return float(values[keep].mean()) if keep.any() else 0.0

    every = np.ones(len(per_query["acg"]), dtype=bool)
    skip = convention.zero_hit == "skip"
    defined = per_query[f"defined_{convention.normalize}"] if skip else every
    ndcg_defined = per_query["ndcg_defined"] if skip else every
    return {"map": mean(per_query[f"ap_{convention.normalize}"], defined),
            "wap": mean(per_query[f"wap_{convention.normalize}"], defined),
            "ndcg": mean(per_query["ndcg"], ndcg_defined),
            "acg": mean(per_query["acg"], every),
            "skipped_queries": int((~defined).sum()),
            "ndcg_skipped_queries": int((~ndcg_defined).sum())}
