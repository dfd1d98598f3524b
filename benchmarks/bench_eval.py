"""Time the evaluation suite of hashing/evaluation/metrics.py against straightforward implementations (per query: an
argsort or a distance mask, then a loop over ranks or radii, as deep-hashing evaluation code does it),
check both give the same figures, and report speed ratio and peak memory.

    python benchmarks/bench_eval.py --scale voc2007     # 4,952 x 5,011, 48 bits, K = 5,011
    python benchmarks/bench_eval.py --scale nuswide --baseline_queries 200   # 2,100 x 193,734, K = 5,000

Data come from benchmarks/bench_map.py (skewed label frequencies, ~1.5 labels per image, label-clustered
codes). The straightforward versions run on --baseline_queries queries (all by default) and their time
is scaled to the full query set; ours runs on all queries, best of --repeats. Peak memory is the peak
of Python-tracked allocations (tracemalloc, numpy's included) during one call with all queries for
ours and with 20 queries for the straightforward versions (they hold one query at a time); the
process peak RSS is printed at the end. "all, one pass" is retrieval_metrics(), which computes
every figure from one pass over the distances, against the sum of the straightforward times.
"""
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_map import benchmark_parser, make_problem, paper_loop_map  # noqa: E402
from hashing.evaluation.metrics import (HAMMING_RADIUS, PAPER_TOP_NS, map_at_k, precision_at_top_n,  # noqa: E402
                           precision_recall_curve, precision_within_radius, retrieval_metrics)


def signs(codes):
    return np.where(codes >= 0, 1.0, -1.0)


def loop_precision_at_top_n(query_codes, query_labels, db_codes, db_labels, top_ns):
    """Per query: stable argsort of the distances, then a loop over ranks up to the largest N."""
    query_codes, db_codes = signs(query_codes), signs(db_codes)
    wanted = set(top_ns)
    sums = dict.fromkeys(top_ns, 0.0)
    for code, label in zip(query_codes, query_labels):
        order = np.argsort(0.5 * (db_codes.shape[1] - db_codes @ code), kind="stable")
        hits = 0
        for rank in range(1, max(top_ns) + 1):
            hits += np.dot(label, db_labels[order[rank - 1]]) > 0
            if rank in wanted:
                sums[rank] += hits / rank
    return np.array([sums[n] / len(query_codes) for n in top_ns])


def loop_pr_curve(query_codes, query_labels, db_codes, db_labels):
    """Per query and per radius r = 0..n: mask the items within r and count. Precision averages over the
    queries retrieving something, recall over the queries with a relevant item (hashing.evaluation.metrics.RadiusCurves)."""
    query_codes, db_codes = signs(query_codes), signs(db_codes)
    num_bits = db_codes.shape[1]
    precision_sum, precision_count = np.zeros(num_bits + 1), np.zeros(num_bits + 1)
    recall_sum, recall_count = np.zeros(num_bits + 1), 0
    for code, label in zip(query_codes, query_labels):
        hamming = 0.5 * (num_bits - db_codes @ code)
        relevant = db_labels @ label > 0
        total_relevant = relevant.sum()
        recall_count += total_relevant > 0
        for radius in range(num_bits + 1):
            retrieved = hamming <= radius
            count, hits = retrieved.sum(), (relevant & retrieved).sum()
            if count:
                precision_sum[radius] += hits / count
                precision_count[radius] += 1
            if total_relevant:
                recall_sum[radius] += hits / total_relevant
    with np.errstate(invalid="ignore"):
        return np.array([precision_sum / precision_count, recall_sum / recall_count])


def loop_precision_within_radius(query_codes, query_labels, db_codes, db_labels, radius=HAMMING_RADIUS):
    """Per query: mask the items within the radius; an empty retrieval counts as precision 0."""
    query_codes, db_codes = signs(query_codes), signs(db_codes)
    total = 0.0
    for code, label in zip(query_codes, query_labels):
        retrieved = 0.5 * (db_codes.shape[1] - db_codes @ code) <= radius
        if retrieved.any():
            total += np.mean(db_labels[retrieved] @ label > 0)
    return total / len(query_codes)


def traced_peak_mb(function):
    """Peak of Python-tracked allocations during one call, in MB."""
    tracemalloc.start()
    function()
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return peak


def best_seconds(function, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main():
    args = benchmark_parser(__doc__, repeats=3).parse_args()
    query_codes, query_labels, db_codes, db_labels, topk = make_problem(args)
    queries, items = len(query_codes), len(db_codes)
    subset = queries if args.baseline_queries < 0 else min(args.baseline_queries, queries)
    scale_up = queries / subset
    print(f"{args.scale}: {queries} queries x {items} database items, {args.bits} bits, K = {topk}, "
          f"top-N {PAPER_TOP_NS[0]}..{PAPER_TOP_NS[-1]}, {args.codes} codes; straightforward versions on "
          f"{subset} queries{'' if subset == queries else f', time x {scale_up:.1f}'}")
    problem = (query_codes, query_labels, db_codes, db_labels)
    sub = (query_codes[:subset], query_labels[:subset], db_codes, db_labels)
    few = (query_codes[:min(subset, 20)], query_labels[:min(subset, 20)], db_codes, db_labels)
    metrics = [  # name, ours, straightforward
        ("mAP@K", lambda p: map_at_k(*p, topk), lambda p: paper_loop_map(*p, topk)),
        ("precision@top-N", lambda p: precision_at_top_n(*p, PAPER_TOP_NS),
         lambda p: loop_precision_at_top_n(*p, PAPER_TOP_NS)),
        ("PR curve (radii 0..n)", lambda p: np.array(precision_recall_curve(*p)[:2]), lambda p: loop_pr_curve(*p)),
        (f"precision radius {HAMMING_RADIUS}", lambda p: precision_within_radius(*p),
         lambda p: loop_precision_within_radius(*p)),
    ]
    print(f"{'metric':<24}{'ours':>10}{'straightforward':>17}{'speed-up':>10}{'max |diff|':>12}"
          f"{'peak MB ours':>14}{'peak MB loop':>14}")
    total_baseline = 0.0
    for name, ours, straightforward in metrics:
        best = best_seconds(lambda: ours(problem), args.repeats)
        started = time.perf_counter()
        reference = straightforward(sub)
        baseline = (time.perf_counter() - started) * scale_up
        total_baseline += baseline
        difference = np.nanmax(np.abs(np.asarray(ours(sub), dtype=float) - np.asarray(reference, dtype=float)))
        print(f"{name:<24}{best * 1000:>8.0f}ms{baseline:>16.1f}s{baseline / best:>9.0f}x{difference:>12.1e}"
              f"{traced_peak_mb(lambda: ours(problem)):>14.0f}{traced_peak_mb(lambda: straightforward(few)):>14.0f}")
    best_all = best_seconds(lambda: retrieval_metrics(*problem, topk, PAPER_TOP_NS), args.repeats)
    peak_all = traced_peak_mb(lambda: retrieval_metrics(*problem, topk, PAPER_TOP_NS))
    print(f"{'all, one pass':<24}{best_all * 1000:>8.0f}ms{total_baseline:>16.1f}s"
          f"{total_baseline / best_all:>9.0f}x{'':>12}{peak_all:>14.0f}")
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
