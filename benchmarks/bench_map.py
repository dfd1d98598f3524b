"""Time hashing.evaluation.metrics.map_at_k against the paper's evaluation loop (argsort, then a Python loop over
ranks j <= K testing relevance with a label dot product), and check both give the same mAP.

    python benchmarks/bench_map.py --scale voc2007          # 4,952 x 5,011, 48 bits, K = 5,011
    python benchmarks/bench_map.py --scale nuswide          # 2,100 x 193,734, 48 bits, K = 5,000

Codes are "clustered" by default (each item's code is the sign of the sum of its classes' random
centres plus noise, so Hamming distances tie as they do for trained codes) or "random" (--codes).
Labels follow a skewed class frequency with about 1.5 labels per image, as in VOC/NUS-WIDE.
"""
import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hashing.evaluation.metrics import map_at_k  # noqa: E402

SCALES = {  # queries, database, classes, K
    "voc2007": (4952, 5011, 20, 5011),
    "nuswide": (2100, 193734, 21, 5000),
}


def make_labels(rng, count, classes):
    frequency = 1.0 / np.arange(1, classes + 1) ** 0.8
    frequency *= 0.5 / frequency.sum()  # 0.5 expected labels on top of the guaranteed one
    labels = rng.random((count, classes)) < frequency
    labels[np.arange(count), rng.choice(classes, size=count, p=frequency / frequency.sum())] = True
    return labels.astype(np.float32)


def make_codes(rng, labels, centres, kind):
    if kind == "random":
        return rng.standard_normal((len(labels), centres.shape[1])).astype(np.float32)
    return (labels @ centres + 0.8 * rng.standard_normal((len(labels), centres.shape[1]))).astype(np.float32)


def paper_loop_map(query_codes, query_labels, db_codes, db_labels, topk):
    """The paper's test(): sign codes, argsort (stable here, so the figure is unique), loop over ranks."""
    query_codes, db_codes = np.where(query_codes >= 0, 1.0, -1.0), np.where(db_codes >= 0, 1.0, -1.0)
    aps = np.zeros(len(query_codes))
    for i in range(len(query_codes)):
        order = np.argsort(1 - db_codes @ query_codes[i] / db_codes.shape[1], kind="stable")
        hits, precision_sum = 0, 0.0
        for j in range(topk):
            if np.dot(query_labels[i], db_labels[order[j]]) > 0:
                hits += 1
                precision_sum += hits / (j + 1)
        if precision_sum > 0:
            aps[i] = precision_sum / hits
    return aps.mean()


def benchmark_parser(description, repeats):
    """The flags every evaluation benchmark shares: scale, bits, kind of codes, repeats, baseline queries, seed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=SCALES, default="voc2007")
    parser.add_argument("--bits", type=int, default=48)
    parser.add_argument("--codes", choices=["clustered", "random"], default="clustered")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs of ours (best is reported)")
    parser.add_argument("--baseline_queries", type=int, default=-1,
                        help="queries the straightforward loop runs on (-1: all; fewer: its time is extrapolated)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_problem(args):
    """(query_codes, query_labels, db_codes, db_labels, K) at the scale and seed of benchmark_parser's flags."""
    queries, items, classes, topk = SCALES[args.scale]
    rng = np.random.default_rng(args.seed)
    query_labels, db_labels = make_labels(rng, queries, classes), make_labels(rng, items, classes)
    centres = rng.standard_normal((classes, args.bits))
    query_codes = make_codes(rng, query_labels, centres, args.codes)
    db_codes = make_codes(rng, db_labels, centres, args.codes)
    return query_codes, query_labels, db_codes, db_labels, topk


def main():
    args = benchmark_parser(__doc__, repeats=5).parse_args()
    query_codes, query_labels, db_codes, db_labels, topk = make_problem(args)
    queries, items = len(query_codes), len(db_codes)
    print(f"{args.scale}: {queries} queries x {items} database items, {args.bits} bits, K = {topk}, "
          f"{args.codes} codes")

    tracemalloc.start()
    ours = map_at_k(query_codes, query_labels, db_codes, db_labels, topk)
    _, peak_alloc = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        map_at_k(query_codes, query_labels, db_codes, db_labels, topk)
        times.append(time.perf_counter() - started)
    best = min(times)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"map_at_k: mAP@{topk} = {ours:.10f}  best {best * 1000:.1f} ms of {args.repeats} "
          f"(median {np.median(times) * 1000:.1f} ms); peak allocation during the call "
          f"{peak_alloc / 2 ** 20:.0f} MB; process peak RSS {rss_mb:.0f} MB")

    if args.baseline_queries == 0:
        return
    subset = queries if args.baseline_queries < 0 else min(args.baseline_queries, queries)
    started = time.perf_counter()
    reference = paper_loop_map(query_codes[:subset], query_labels[:subset], db_codes, db_labels, topk)
    baseline = (time.perf_counter() - started) * queries / subset
    ours_subset = map_at_k(query_codes[:subset], query_labels[:subset], db_codes, db_labels, topk)
    note = "" if subset == queries else f" (timed on {subset} queries, scaled to {queries})"
    print(f"paper loop: mAP@{topk} = {reference:.10f}  {baseline:.1f} s{note}")
    print(f"difference {abs(reference - ours_subset):.1e}; speed-up {baseline / best:.0f}x")


if __name__ == "__main__":
    main()
