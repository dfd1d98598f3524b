"""Milvus Lite (the embedded engine, hashing/search/milvus.py) against HammingIndex on the same synthetic codes: insert
throughput, search latency at batch 1 and batch 1,000, and recall@k by distance level against the exact ranking.

    python benchmarks/bench_milvus.py                                    # 1 M clustered 64-bit codes (long)
    python benchmarks/bench_milvus.py --size 20000 --queries 50 --single 5 --codes uniform   # a quick check

Codes as benchmarks/bench_search.py draws them (--codes clustered by default: a trained network's codes cluster by
class). Insert: HammingIndex.build of the whole array (its default method, "auto": mih from 100,000 codes) against
Milvus's upserts of --insert_batch rows, until the collection is loaded and its count says every row is there.
Search: batch 1 is the median over --single one-query searches, batch 1,000 one search of --queries queries over
their number; Milvus's figures are its own answer (search_raw: no re-sort, no second request for whole tie groups).
Milvus Lite runs in a server process on the same machine (the two cores are shared with this client); a cluster
adds network round trips and spreads a collection over shards (docs/SEARCH.md, "Past one machine: Milvus").

The table is printed and written to OUTPUT_DIR/bench_milvus_{bits}bit.md; the Milvus Lite file goes to a temporary
folder unless --uri names one (it must not exist yet).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_search import synthetic_codes  # noqa: E402
from hashing.search.export_verify import recall_by_distance_level, true_distances  # noqa: E402
from hashing.search.index import HammingIndex  # noqa: E402
from hashing.search.milvus import MilvusBackend, import_pymilvus  # noqa: E402
from utils.argtypes import int_in_range, positive_int  # noqa: E402
from utils.atomic import ensure_writable_dir, write_text  # noqa: E402
from utils.errors import UserError, run_reporting_errors  # noqa: E402
from utils.runlog import progress_bar  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=positive_int, default=1_000_000, help="database codes")
    parser.add_argument("--bits", type=int_in_range(8, 4096), default=64, help="code length")
    parser.add_argument("--codes", choices=["uniform", "clustered"], default="clustered")
    parser.add_argument("--k", type=int_in_range(1, 16384), default=100, help="neighbours per query")
    parser.add_argument("--queries", type=positive_int, default=1000, help="queries of the batch search")
    parser.add_argument("--single", type=positive_int, default=100, help="one-query searches timed for batch 1")
    parser.add_argument("--insert_batch", type=positive_int, default=10_000, help="rows per Milvus upsert")
    parser.add_argument("--classes", type=positive_int, default=100, help="centres of the clustered codes")
    parser.add_argument("--flip", type=float, default=0.1, help="bit flip probability of the clustered codes")
    parser.add_argument("--uri", default=None, help="the Milvus Lite file (default: in a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="./result")
    return parser


def timed_searches(search, queries, single_queries, k):
    """(median one-query seconds, batch seconds per query, the batch's answer)."""
    search(queries[:1], k)  # warm-up
    latencies = []
    for query in single_queries:
        started = time.perf_counter()
        search(query[None], k)
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    answer = search(queries, k)
    return float(np.median(latencies)), (time.perf_counter() - started) / len(queries), answer


def measure_index(database, queries, single_queries, k):
    started = time.perf_counter()
    index = HammingIndex.build(database)
    insert = time.perf_counter() - started
    single, batch, answer = timed_searches(index.search, queries, single_queries, k)
    return {"engine": f"HammingIndex ({index.resolved_method})", "insert_s": insert, "single": single,
            "batch": batch}, answer


def measure_milvus(uri, database, queries, single_queries, args):
    record = {"checkpoint_sha256": "benchmark", "hash_bit": args.bits, "source": f"{args.codes} codes",
              "source_sha256": str(args.seed), "rows": len(database)}
    started = time.perf_counter()
    backend = MilvusBackend.create(uri, "bench", record, label_length=1)
    try:
        with progress_bar(total=len(database), desc="milvus upserts", unit="code") as bar:
            for start in range(0, len(database), args.insert_batch):
                rows = database[start:start + args.insert_batch]
                backend.add(rows, np.arange(start, start + len(rows)))
                bar.update(len(rows))
        if len(backend) != len(database):
            raise UserError(f"Milvus holds {len(backend):,} of the {len(database):,} codes inserted")
        insert = time.perf_counter() - started
        single, batch, answer = timed_searches(backend.search_raw, queries, single_queries, args.k)
    finally:
        backend.close()
    return {"engine": f"Milvus Lite ({backend.index_type})", "insert_s": insert, "single": single,
            "batch": batch}, answer


def markdown_table(rows, args):
    header = (f"| engine | N | insert (s) | insert (codes/s) | batch 1 (ms/query) | batch {args.queries:,} (ms/query) | "
              f"recall@{args.k} by distance level |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        lines.append(f"| {row['engine']} | {args.size:,} | {row['insert_s']:.2f} | {args.size / row['insert_s']:,.0f} | "
                     f"{1e3 * row['single']:.3f} | {1e3 * row['batch']:.3f} | {row['recall']:.4f} |")
    return "\n".join(lines)


def main(args):
    if args.size < args.k:
        raise UserError(f"--size must be at least --k ({args.k})")
    pymilvus = import_pymilvus()
    ensure_writable_dir(args.output_dir)
    rng = np.random.default_rng(args.seed)
    centres = rng.random((args.classes, args.bits)) < 0.5
    database, queries, single_queries = (synthetic_codes(rng, args.codes, count, args.bits, centres, args.flip)
                                         for count in (args.size, args.queries, args.single))
    index_row, exact = measure_index(database, queries, single_queries, args.k)
    with tempfile.TemporaryDirectory() as folder:
        uri = args.uri or str(Path(folder) / "bench.db")
        if Path(uri).exists():
            raise UserError(f"--uri {uri} exists; the benchmark writes a new Milvus Lite file")
        milvus_row, answer = measure_milvus(uri, database, queries, single_queries, args)
    rows = []
    for row, (_, ids) in ((index_row, exact), (milvus_row, answer)):
        found = true_distances(queries, database, ids, args.bits)
        rows.append({**row, "recall": float(recall_by_distance_level(exact[0], found, args.bits).mean())})
    text = (f"Milvus benchmark: {args.size:,} {args.codes} {args.bits}-bit codes, k = {args.k}, {args.queries:,} batch "
            f"queries, {args.single} single queries, seed {args.seed}; {os.cpu_count()} CPUs; pymilvus "
            f"{pymilvus.__version__}, Milvus Lite as the embedded engine.\n\n{markdown_table(rows, args)}\n")
    print(text)
    path = Path(args.output_dir) / f"bench_milvus_{args.bits}bit.md"
    write_text(path, text)
    print(f"wrote {path}")
    return rows


def cli():
    run_reporting_errors(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
