"""Time every mAP convention and the graded metrics against today's mAP and the XOR + popcount floor,
all measured in the same run (the machine is shared: read the ratios, not the seconds).

    python benchmarks/bench_conventions.py --scale voc2007      # 4,952 x 5,011, 48 bits, K = 5,011
    python benchmarks/bench_conventions.py --scale nuswide      # 2,100 x 193,734, 48 bits, K = 5,000

Rows: the floor (Hamming distances of all pairs, chunked, on the same threads, nothing else); the default
mAP (map_of_codes, the paper's convention); one pass per tie rule computing every normalize/zero_hit
and NDCG/ACG/WAP (ranking_metrics_of_codes); and all 18 conventions together (convention_table, the
standalone evaluator's work). These use the fused numba kernel when numba is installed (hashing/evaluation/fused.py);
--numpy adds the default mAP and convention_table on the NumPy path (the fallback, and the code before the
kernel), timed in the same run. Peak traced allocation of convention_table is printed at the end.
"""
import os
import resource
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_map import benchmark_parser, make_problem  # noqa: E402
from hashing.evaluation import fused
from hashing.evaluation import metrics
from hashing.codes import CodeSet, hamming_distances, word_columns  # noqa: E402
from hashing.evaluation.conventions import Convention  # noqa: E402


def popcount_floor(codes, threads):
    """XOR + popcount of every query-database pair, in metrics' chunks and threads, and nothing else."""
    query, database = word_columns(codes.query_bits), word_columns(codes.database_bits)
    rows = max(1, metrics._CHUNK_ELEMENTS // len(codes.database_bits))

    def chunk(start):
        return int(hamming_distances([w[start:start + rows] for w in query], database, codes.hash_bit)[0, 0])
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(chunk, range(0, len(codes.query_bits), rows)))


def without_kernel(work):
    """work() on the NumPy path of hashing/evaluation/metrics.py."""
    def run():
        enabled, fused.enabled = fused.enabled, False
        try:
            work()
        finally:
            fused.enabled = enabled
    return run


def best_seconds_round_robin(rows, repeats):
    """Best time of each (name, work) row over `repeats` rounds, every round running every row once, so that
    the load of a shared machine changes the rows alike (after one untimed round: compilation, caches)."""
    best = {name: float("inf") for name, _ in rows}
    for round_number in range(repeats + 1):
        for name, work in rows:
            started = time.perf_counter()
            work()
            if round_number:
                best[name] = min(best[name], time.perf_counter() - started)
    return best


def main():
    parser = benchmark_parser(__doc__, repeats=3)
    parser.add_argument("--numpy", action="store_true", help="also time the NumPy path (hashing.evaluation.fused disabled)")
    args = parser.parse_args()
    query_codes, query_labels, db_codes, db_labels, topk = make_problem(args)
    codes = CodeSet.from_outputs(query_codes, query_labels, db_codes, db_labels)
    threads = min(4, os.cpu_count() or 1)
    print(f"{args.scale}: {len(query_codes)} queries x {len(db_codes)} items, {args.bits} bits, K = {topk}, "
          f"{args.codes} codes, {threads} threads, best of {args.repeats}, fused kernel "
          f"{'on' if fused.available() else 'off (numba not installed)'}")
    rows = [("XOR + popcount floor", lambda: popcount_floor(codes, threads)),
            ("default mAP (hits, zero, index)", lambda: metrics.map_of_codes(codes, topk))]
    rows += [(f"ties={ties}: every normalize/zero_hit + NDCG/ACG/WAP",
              lambda ties=ties: metrics.ranking_metrics_of_codes(codes, topk, Convention(ties=ties)))
             for ties in ("index", "random", "aware")]
    rows.append(("all 18 conventions + graded (convention_table)", lambda: metrics.convention_table(codes, topk)))
    if args.numpy:
        rows += [("NumPy path: mAP (hits, zero, index)", without_kernel(lambda: metrics.map_of_codes(codes, topk))),
                 ("NumPy path: convention_table", without_kernel(lambda: metrics.convention_table(codes, topk)))]
    seconds = best_seconds_round_robin(rows, args.repeats)
    floor, today = seconds[rows[0][0]], seconds[rows[1][0]]
    print(f"{'':52} {'seconds':>8} {'/ floor':>8} {'/ mAP':>7}  (mAP: the default mAP row)")
    for name, value in seconds.items():
        print(f"{name:52} {value:8.3f} {value / floor:8.2f} {value / today:7.2f}")
    tracemalloc.start()
    metrics.convention_table(codes, topk)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"peak traced allocation of convention_table {peak / 2 ** 20:.0f} MB; process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
