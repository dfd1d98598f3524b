"""Time the search methods on synthetic codes, interleaved in one process: build time, memory, query latency at
batch 1 and batch 1,000, and recall@k against the exact ranking.

    python benchmarks/bench_search.py --sizes 1000000 10000000            # the full measurement (long)
    python benchmarks/bench_search.py --sizes 1000000 --methods flat hnsw  # HNSW, asked for by name
    python benchmarks/bench_search.py --sizes 100000 --queries 200 --single 20 --methods flat mih  # a quick check

Methods: those of hashing/search/index.py (flat, mih, auto, ivf, hnsw), "flat-numpy" (flat without FAISS)
and "faiss" (FAISS's IndexBinaryFlat searched directly, outside the index: what the flat scan costs alone).

Codes (--codes, both by default): "uniform" draws every bit at random, the hardest case for a sub-linear
index (the 100th neighbour of a query among 10 M 64-bit codes lies at distance ~14, with nothing closer to
separate it); "clustered" draws each code from one of --classes random centres with each bit flipped with
probability --flip, as a trained hashing network's codes cluster by class. Queries are drawn the same way,
independently of the database. The exact ranking is the "flat" method's; recall@k is the share of its k ids
that a method returns, and "same ranking" the share of queries whose k (distance, id) pairs equal it exactly.

Latency: batch 1 is the median over --single searches of one query each; batch 1,000 the median over
--rounds searches of --queries queries, divided by their number. The methods are timed interleaved: each
query (each batch round) is searched by every method in turn, the order rotating, so that all see the same
load on the machine. Each method searches once before it is timed (numba loads its compiled code then).
FAISS and "mih" use --threads threads (1 by default; 0: FAISS's OpenMP default and mih up to 4); the header
of the table says how many. Memory is nbytes: the codes and ids held plus the search structure.

The table is printed and written to OUTPUT_DIR/bench_search_{bits}bit.md.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hashing.search import mih  # noqa: E402
from hashing.search.flat import faiss_flat_index  # noqa: E402
from hashing.search.index import HammingIndex, METHODS, import_faiss  # noqa: E402
from utils.atomic import ensure_writable_dir, write_text  # noqa: E402
from utils.errors import UserError, run_reporting_errors  # noqa: E402

CHUNK = 1_000_000  # codes generated at a time: bounded temporary memory at 10 M
# HNSW's graph took 76-124 s to build over 1 M codes (docs/SEARCH.md) and grows faster than linearly, so it is
# measured only when asked for, with a warning above this size.
HNSW_WARN_SIZE = 1_000_000


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000],
                        help="database sizes (number of codes)")
    parser.add_argument("--bits", type=int, default=64, help="code length")
    parser.add_argument("--codes", nargs="+", choices=["uniform", "clustered"], default=["uniform", "clustered"])
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, "flat-numpy", "faiss"],
                        default=["flat", "faiss", "flat-numpy", "mih", "auto", "ivf"],
                        help="methods to measure (flat is the reference; flat-numpy: flat without FAISS; faiss: "
                             "IndexBinaryFlat alone, outside the index); hnsw only when named: its graph takes "
                             "minutes per million codes to build")
    parser.add_argument("--k", type=int, default=100, help="neighbours per query (recall@k)")
    parser.add_argument("--queries", type=int, default=1000, help="queries of the batch search")
    parser.add_argument("--single", type=int, default=100, help="one-query searches timed for batch 1")
    parser.add_argument("--classes", type=int, default=100, help="centres of the clustered codes")
    parser.add_argument("--flip", type=float, default=0.1, help="bit flip probability of the clustered codes")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of FAISS (OpenMP) and of mih (0: FAISS's default, mih up to 4)")
    parser.add_argument("--rounds", type=int, default=3, help="batch searches per method (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="./result")
    return parser


def synthetic_codes(rng, kind, count, bits, centres, flip):
    """Packed (count, ceil(bits / 8)) codes, generated CHUNK rows at a time."""
    parts = []
    for start in range(0, count, CHUNK):
        rows = min(CHUNK, count - start)
        if kind == "uniform":
            signs = rng.random((rows, bits)) < 0.5
        else:
            signs = centres[rng.integers(len(centres), size=rows)] ^ (rng.random((rows, bits)) < flip)
        parts.append(np.packbits(signs, axis=1))
    return np.concatenate(parts)


class FaissAlone:
    """FAISS's IndexBinaryFlat searched directly (ids = rows): the flat scan without the index around it."""
    exact = True

    def __init__(self, database):
        self.index = faiss_flat_index(database)

    @property
    def nbytes(self):
        return self.index.ntotal * self.index.code_size

    def search(self, queries, k):
        return self.index.search(queries, k)


def build(method, database):
    """(the searchable index of `method`, its build time in seconds)."""
    def new(codes):
        if method == "faiss":
            return FaissAlone(codes)
        if method == "flat-numpy":
            return HammingIndex.build(codes, method="flat", use_faiss=False)
        return HammingIndex.build(codes, method=method)

    new(database[:1000])  # imports (numba, FAISS) are not part of the build time
    started = time.perf_counter()
    index = new(database)
    return index, time.perf_counter() - started


def interleaved_latencies(indexes, queries, single_queries, k, rounds):
    """{method: (median seconds of one query alone, median seconds a query in a batch)}, every method timed
    query by query in turn (the order rotating), so that all see the same load on the machine."""
    names = list(indexes)
    for index in indexes.values():
        index.search(queries[:1], k)  # warm-up: numba's compiled code, FAISS's first call
    single = {name: [] for name in names}
    for number, query in enumerate(single_queries):
        for name in names[number % len(names):] + names[:number % len(names)]:
            started = time.perf_counter()
            indexes[name].search(query[None], k)
            single[name].append(time.perf_counter() - started)
    batch = {name: [] for name in names}
    for number in range(rounds):
        for name in names[number % len(names):] + names[:number % len(names)]:
            started = time.perf_counter()
            indexes[name].search(queries, k)
            batch[name].append((time.perf_counter() - started) / len(queries))
    return {name: (np.median(single[name]), np.median(batch[name])) for name in names}


def measure_methods(methods, database, queries, single_queries, k, rounds):
    """The table's rows of one database: build, memory, interleaved latencies, recall@k and exact agreement
    with the first method's ranking (flat's)."""
    built = {method: build(method, database) for method in methods}
    indexes = {method: index for method, (index, _) in built.items()}
    latencies = interleaved_latencies(indexes, queries, single_queries, k, rounds)
    exact = None
    rows = []
    for method, (index, build_seconds) in built.items():
        distances, ids = index.search(queries, k)
        if exact is None:
            exact = distances, ids
        recall = np.mean([len(np.intersect1d(found, true)) / k for found, true in zip(ids, exact[1])])
        same = np.mean(np.all((ids == exact[1]) & (distances == exact[0]), axis=1))
        rows.append({"method": method, "exact": "yes" if index.exact else "no", "build_s": build_seconds,
                     "memory_mib": index.nbytes / 2 ** 20, "batch1_ms": 1e3 * latencies[method][0],
                     "batch_ms": 1e3 * latencies[method][1], "recall": recall, "same": same})
    return rows


def markdown_table(rows, args):
    header = ("| codes | N | method | exact | build (s) | memory (MiB) | batch 1 (ms/query) | "
              f"batch {args.queries:,} (ms/query) | recall@{args.k} | same ranking |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        lines.append(f"| {row['codes']} | {row['size']:,} | {row['method']} | {row['exact']} | {row['build_s']:.2f} | "
                     f"{row['memory_mib']:.1f} | {row['batch1_ms']:.3f} | {row['batch_ms']:.3f} | "
                     f"{row['recall']:.4f} | {row['same']:.3f} |")
    return "\n".join(lines)


def environment(args):
    import numba
    faiss = import_faiss()
    return (f"{args.bits}-bit codes, k = {args.k}, {args.queries:,} batch queries, {args.single} single queries, "
            f"seed {args.seed}; {os.cpu_count()} CPUs; FAISS {faiss.__version__} ({faiss.omp_get_max_threads()} "
            f"threads), numba {numba.__version__} (mih: {mih.search_threads()} threads)")


def main(args):
    if "flat" not in args.methods:
        raise UserError("--methods must include flat: it gives the exact ranking the others are compared with")
    if min(args.sizes) < args.k or args.queries < 1 or args.single < 1 or args.rounds < 1:
        raise UserError(f"--sizes must be at least --k ({args.k}), --queries, --single and --rounds at least 1")
    ensure_writable_dir(args.output_dir)
    if args.threads:
        import_faiss().omp_set_num_threads(args.threads)
        mih.THREADS = args.threads
    methods = ["flat"] + [m for m in args.methods if m != "flat"]
    slow = [size for size in args.sizes if size > HNSW_WARN_SIZE]
    if "hnsw" in methods and slow:
        print(f"warning: hnsw at {', '.join(f'{size:,}' for size in slow)} codes: its graph took 76-124 s to build "
              f"over {HNSW_WARN_SIZE:,} codes (docs/SEARCH.md) and grows faster than linearly, so expect tens of "
              "minutes to hours per build on a CPU", file=sys.stderr)
    rows = []
    for kind in args.codes:
        for size in args.sizes:
            rng = np.random.default_rng(args.seed)
            centres = rng.random((args.classes, args.bits)) < 0.5
            database = synthetic_codes(rng, kind, size, args.bits, centres, args.flip)
            queries = synthetic_codes(rng, kind, args.queries, args.bits, centres, args.flip)
            single_queries = synthetic_codes(rng, kind, args.single, args.bits, centres, args.flip)
            for row in measure_methods(methods, database, queries, single_queries, args.k, args.rounds):
                rows.append({"codes": kind, "size": size, **row})
                print(f"{kind} {size:,} {row['method']}: build {row['build_s']:.2f}s, batch 1 {row['batch1_ms']:.3f} "
                      f"ms, batch {args.queries:,} {row['batch_ms']:.3f} ms/query, recall@{args.k} "
                      f"{row['recall']:.4f}", file=sys.stderr)
    table = markdown_table(rows, args)
    text = f"Search benchmark: {environment(args)}.\n\n{table}\n"
    print(text)
    path = Path(args.output_dir) / f"bench_search_{args.bits}bit.md"
    write_text(path, text)
    print(f"wrote {path}")


def cli():
    run_reporting_errors(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
