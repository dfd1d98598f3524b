"""Fit the cost model of method "auto" (hashing/search/auto.py): time the flat scan (FAISS IndexBinaryFlat when
installed) and multi-index hashing on uniformly random codes over a grid of code lengths, sizes, k and radii,
interleaved in one process on one thread, and fit the model's coefficients to the times.

    python benchmarks/fit_search_cost.py                    # the full grid; writes hashing/search/search_cost.json
    python benchmarks/fit_search_cost.py --bits 32 64 --sizes 2000 20000 --k 10 --radii 2 --queries 5 \\
        --budget 0.2 --output /tmp/cost.json --table /tmp/cost.md   # a smoke run of a few seconds

Each query is searched by both methods one after the other (which goes first alternates), so both see the
same machine load; a measurement is the median over --queries single-query searches, or over those done
within --budget seconds (at least 3). Configurations of more than --max_volume bits (N x code length) are
skipped (multi-index tables of 256-bit codes hold ~16 copies of them). The fit minimises the relative error
(each row weighted by 1 / measured time); coefficients below 0 are set to 0.

It writes the coefficients with the command, the machine and the fit's quality to --output (the file
hashing/search/auto.py reads), and a markdown table of every measurement (flat, mih, the faster, the model's
choice) to --table, printed too: docs/SEARCH.md's "Where each method wins" is that table.
"""
import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hashing.search import mih  # noqa: E402
from hashing.search.auto import COST_FILE, DEFAULT_COEFFICIENTS, knn_radius, mih_work  # noqa: E402
from hashing.search.backend import faiss_available, import_faiss  # noqa: E402
from hashing.search.flat import FlatBackend  # noqa: E402
from hashing.search.mih import MultiIndexBackend  # noqa: E402
from utils.atomic import ensure_writable_dir, write_json, write_text  # noqa: E402
from utils.errors import UserError, run_reporting_errors  # noqa: E402
from utils.paths import check_output_target  # noqa: E402
from utils.runlog import progress_bar  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[32, 64, 128, 256], help="code lengths")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000],
                        help="database sizes (number of codes)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10, 100, 1000], help="k of the k-nearest searches")
    parser.add_argument("--radii", type=int, nargs="+", default=[0, 2, 4, 8, 16, 32],
                        help="radii of the radius searches (those of at least half the code length are skipped)")
    parser.add_argument("--queries", type=int, default=50, help="single-query searches per measurement (at most)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per measurement before it stops early")
    parser.add_argument("--max_volume", type=float, default=1e9, help="largest N x code length measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(COST_FILE), help="the coefficients file (auto.py reads the default)")
    parser.add_argument("--table", default="./result/search_cost.md", help="the markdown table of the measurements")
    return parser


def median_seconds(searches, queries, budget):
    """{name: median seconds of one query} of each search in `searches`, run interleaved query by query."""
    for search in searches.values():
        search(queries[:1])  # warm-up: numba's compiled code, FAISS's first call
    times = {name: [] for name in searches}
    names = list(searches)
    started = time.perf_counter()
    for number, query in enumerate(queries):
        for name in names[::-1] if number % 2 else names:
            begin = time.perf_counter()
            searches[name](query[None])
            times[name].append(time.perf_counter() - begin)
        if number >= 2 and time.perf_counter() - started > budget:
            break
    return {name: float(np.median(values)) for name, values in times.items()}


def uniform_codes(rng, count, bits):
    """Packed uniformly random codes, drawn as bytes (no array of count x bits)."""
    codes = rng.integers(0, 256, (count, -(-bits // 8)), dtype=np.uint8)
    codes[:, -1] &= np.uint8((0xFF << (-bits % 8)) & 0xFF)  # the padding bits are 0
    return codes


def measure(args):
    """[{bits, size, substrings, k, radius, flat, mih}] over the grid."""
    rng = np.random.default_rng(args.seed)
    grid = [(bits, size) for bits in args.bits for size in args.sizes if bits * size <= args.max_volume]
    rows = []
    for bits, size in progress_bar(grid, desc="fit_search_cost", unit="config"):
        codes, queries = uniform_codes(rng, size, bits), uniform_codes(rng, args.queries, bits)
        ids = np.arange(size, dtype=np.int64)
        flat, tables = FlatBackend(bits), MultiIndexBackend(bits)
        flat.add(codes, ids)
        tables.add(codes, ids)
        tables.prepare()
        substrings = tables.tables.substrings
        plans = [("k", k) for k in args.k if k <= size] + [("radius", r) for r in args.radii if 2 * r < bits]
        for kind, value in plans:
            if kind == "k":
                searches = {"flat": lambda q, k=value: flat.search(q, k), "mih": lambda q, k=value: tables.search(q, k)}
            else:
                searches = {"flat": lambda q, r=value: flat.search_radius(q, r),
                            "mih": lambda q, r=value: tables.search_radius(q, r)}
            seconds = median_seconds(searches, queries, args.budget)
            rows.append({"bits": bits, "size": size, "substrings": substrings, kind: value, **seconds})
    return rows


def features(row):
    """(flat features, mih features) of one measurement, as auto.predicted_seconds combines them."""
    words = -(-row["bits"] // 64)
    reach = row["radius"] if "radius" in row else knn_radius(row["size"], row["bits"], row["k"])
    buckets, met = mih_work(row["size"], row["bits"], row["substrings"], min(reach, row["bits"]))
    return [1.0, row["size"] * words], [1.0, buckets, met * words]


def fit(rows):
    """The coefficients of DEFAULT_COEFFICIENTS's names, fitted for the least relative error."""
    fitted = {}
    for method, names in (("flat", ["flat_fixed", "flat_per_word"]),
                          ("mih", ["mih_fixed", "mih_per_bucket", "mih_per_candidate"])):
        column = 0 if method == "flat" else 1
        matrix = np.array([features(row)[column] for row in rows])
        times = np.array([row[method] for row in rows])
        solution = np.linalg.lstsq(matrix / times[:, None], np.ones(len(rows)), rcond=None)[0]
        fitted.update(zip(names, np.maximum(solution, 0.0).tolist()))
    return fitted


def predicted(fitted, row):
    flat, multi = features(row)
    return (fitted["flat_fixed"] + fitted["flat_per_word"] * flat[1],
            fitted["mih_fixed"] + fitted["mih_per_bucket"] * multi[1] + fitted["mih_per_candidate"] * multi[2])


def markdown_table(rows, fitted):
    lines = ["| bits | N | query | flat (ms) | mih (ms) | flat / mih | faster | auto picks |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        flat, multi = predicted(fitted, row)
        query = f"k = {row['k']}" if "k" in row else f"r = {row['radius']}"
        lines.append(f"| {row['bits']} | {row['size']:,} | {query} | {1e3 * row['flat']:.3f} | {1e3 * row['mih']:.3f} | "
                     f"{row['flat'] / row['mih']:.2f} | {'mih' if row['mih'] < row['flat'] else 'flat'} | "
                     f"{'mih' if multi < flat else 'flat'} |")
    return "\n".join(lines)


def quality(rows, fitted):
    """(share of measurements where the model picks the faster method, worst time of its pick / the best's)."""
    right, worst = 0, 1.0
    for row in rows:
        flat, multi = predicted(fitted, row)
        chosen = row["mih"] if multi < flat else row["flat"]
        best = min(row["mih"], row["flat"])
        right += chosen == best
        worst = max(worst, chosen / best)
    return right / len(rows), worst


def machine():
    import numba
    faiss = import_faiss() if faiss_available() else None
    return {"cpus": os.cpu_count(), "threads": 1, "platform": platform.platform(), "numba": numba.__version__,
            "faiss": faiss.__version__ if faiss else None}


def main(args):
    if min(args.bits) < 8 or min(args.sizes) < 100 or args.queries < 3 or args.budget <= 0:
        raise UserError("--bits must be at least 8, --sizes at least 100, --queries at least 3 and --budget above 0")
    ensure_writable_dir(Path(args.output).parent, "--output")
    ensure_writable_dir(Path(args.table).parent, "--table")
    # before the measurements (an hour for the full grid), not when writing after them
    check_output_target(args.output, "--output")
    check_output_target(args.table, "--table", inputs=[("--output", args.output)])
    if faiss_available():
        import_faiss().omp_set_num_threads(1)
    mih.THREADS = 1  # one thread each: the model prices one query on one core
    rows = measure(args)
    if len(rows) < len(DEFAULT_COEFFICIENTS):
        raise UserError(f"only {len(rows)} measurements: widen --bits, --sizes, --k or --radii")
    fitted = fit(rows)
    agreement, worst = quality(rows, fitted)
    record = {"command": "python benchmarks/fit_search_cost.py " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(), "coefficients": fitted,
              "measurements": len(rows), "picks_the_faster": round(agreement, 3),
              "worst_pick_over_best": round(worst, 3)}
    write_json(Path(args.output), record)
    table = markdown_table(rows, fitted)
    summary = (f"{len(rows)} measurements; the fitted model picks the faster method in {agreement:.0%} of them, "
               f"its worst pick {worst:.2f}x the faster's time")
    write_text(Path(args.table), f"{summary}\n\n{table}\n")
    print(f"{table}\n\n{summary}; wrote {args.output} and {args.table}")


def cli():
    run_reporting_errors(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
