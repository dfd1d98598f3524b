"""The nested-codes study of docs/STUDIES.md (definitions: docs/METHOD.md §14): for HyP², CSQ and OrthoHash, one
nested run (--nested_bits 16 32 64) against three separate runs (16, 32 and 64 bits), on digits and on
fashion_mosaic: mAP at each length and the total training time. Each cell is a full training run of retrieval.py;
the tables go to OUTPUT_DIR/nested_study.md (rewritten atomically after every cell) and to stdout.

    python benchmarks/nested_study.py                                   # both datasets (docs/STUDIES.md's tables)
    python benchmarks/nested_study.py --datasets digits --losses hyp2
    python benchmarks/nested_study.py --quick --output_dir /tmp/nested  # a smoke run of a few seconds per cell
    python benchmarks/nested_study.py --table_only                      # the table of the finished cells only

Budget (2 cores): digits, small backbone, 10 epochs on the whole set; fashion_mosaic, small backbone, the first
1,000 mosaics of each split (--subset 1000), 5 epochs. One evaluation after the last epoch, seed 0. A finished cell
with the same settings is reused and an interrupted one resumed (benchmarks/compare.py), so a rerun completes the
study.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retrieval  # noqa: E402
from benchmarks import compare  # noqa: E402
from utils.argtypes import positive_int, seed_value  # noqa: E402
from utils.atomic import write_text  # noqa: E402
from utils.errors import run_reporting_errors  # noqa: E402

# Per dataset: its flags and epochs (the --quick ones in brackets' place: a subset and 1 epoch).
DATASETS = {"digits": ([], 10), "fashion_mosaic": (["--subset", "1000"], 5)}
QUICK = (["--subset", "200"], 1)
LOSSES = ("hyp2", "csq", "orthohash")
NESTED = "nested"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=[16, 32, 64],
                        help="the nested lengths (ascending), each also one separate run")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--data_root", default="./data")
    parser.add_argument("--output_dir", default="./result")
    parser.add_argument("--quick", action="store_true", help="200 images, 1 epoch: proves the harness runs")
    parser.add_argument("--verbose", action="store_true", help="show each run's output")
    parser.add_argument("--table_only", action="store_true", help="train nothing: tabulate the finished cells")
    return parser


def cell_args(options, dataset, loss, scheme):
    """retrieval.py's arguments of one cell: scheme NESTED (one run of every length) or a length b (b bits alone)."""
    flags, epochs = QUICK if options.quick else DATASETS[dataset]
    bits = options.lengths[-1] if scheme == NESTED else scheme
    output_dir = Path(options.output_dir) / "nested_study" / f"{dataset}_{loss}_{scheme}_seed{options.seed}"
    argv = ["--dataset", dataset, "--data_root", options.data_root, "--backbone", "small", "--loss", loss,
            "--hash_bit", str(bits), "--epochs", str(epochs), "--eval_every", str(epochs), "--seed", str(options.seed),
            "--output_dir", str(output_dir), "--no_progress", "--overwrite", *flags]
    if scheme == NESTED:
        argv += ["--nested_bits", *map(str, options.lengths)]
    return retrieval.get_args_parser().parse_args(argv)


def cell_result(args):
    """({length: mAP}, training seconds) of a finished cell, else None."""
    record = compare.finished_record(args)
    if record is None:
        return None
    maps = record.get("map_by_bits") or {str(args.hash_bit): record["test_map"]}
    return {int(bits): value for bits, value in maps.items()}, record["train_seconds"]


def render_dataset(options, dataset, results):
    lengths = options.lengths
    lines = [f"### {dataset}", "", "| loss | " + " | ".join(f"{b} bits: nested / separate" for b in lengths)
             + " | training s: nested / separate (sum) |", "|---|" + "---|" * (len(lengths) + 1)]
    for loss in options.losses:
        nested = results[(dataset, loss, NESTED)]
        separate = [results[(dataset, loss, bits)] for bits in lengths]
        cells = [f"{nested[0][b]:.4f}" if nested else "—" for b in lengths]
        cells = [f"{n} / {s[0][b]:.4f}" if s else f"{n} / —" for n, s, b in zip(cells, separate, lengths)]
        nested_time = f"{nested[1]:.0f}" if nested else "—"
        separate_time = f"{sum(s[1] for s in separate):.0f}" if all(separate) else "—"
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {nested_time} / {separate_time} |")
    return lines + [""]


def render(options, results, command):
    flags = {name: QUICK if options.quick else setting for name, setting in DATASETS.items()}
    lines = ["## Nested codes: one run against separate runs", "",
             f"Small backbone, seed {options.seed}; mAP@K (the dataset's K) after the last epoch; nested = one run "
             f"with --nested_bits {' '.join(map(str, options.lengths))}, its mAP at each prefix length; separate = one "
             "run per length. Epochs and data: " + "; ".join(
                 f"{name} {epochs} epochs{' ' + ' '.join(extra) if extra else ''}"
                 for name, (extra, epochs) in flags.items() if name in options.datasets) + ".", ""]
    for dataset in options.datasets:
        lines += render_dataset(options, dataset, results)
    return "\n".join(lines + compare.generated_lines(command))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    options = get_args_parser().parse_args(argv)
    compare.distinct(options.lengths, "--lengths")
    options.lengths = sorted(options.lengths)
    command = "python benchmarks/nested_study.py " + " ".join(argv)
    grid = [(dataset, loss, scheme) for dataset in options.datasets for loss in options.losses
            for scheme in (NESTED, *options.lengths)]
    results = {key: cell_result(cell_args(options, *key)) for key in grid}
    table = Path(options.output_dir) / "nested_study.md"
    Path(options.output_dir).mkdir(parents=True, exist_ok=True)
    started, failures = time.perf_counter(), []
    for done, key in enumerate([] if options.table_only else grid, start=1):
        if results[key] is not None:
            continue
        cell_started = time.perf_counter()
        error = compare.train_or_resume(cell_args(options, *key), options.verbose)
        results[key] = None if error else cell_result(cell_args(options, *key))
        if results[key] is None and not error:
            error = "it finished, but its run log does not record this cell's settings or cannot be tabulated"
        failures += [f"{key}: {error}"] if error else []
        outcome = f"failed: {error}" if error else ", ".join(f"{b} bits {m:.4f}" for b, m in results[key][0].items())
        print(f"[{done}/{len(grid)}] {' '.join(map(str, key))}: {outcome} ({time.perf_counter() - cell_started:.0f}s)",
              flush=True)
        write_text(table, render(options, results, command))
    text = render(options, results, command)
    write_text(table, text)
    print(text)
    print(f"{sum(r is not None for r in results.values())}/{len(grid)} cells done in "
          f"{time.perf_counter() - started:.0f}s; table {table}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if run_reporting_errors(main) else 0)
