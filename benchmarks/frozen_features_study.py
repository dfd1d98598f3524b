"""What a deep loss buys over the classic shallow hashers (docs/STUDIES.md, "Frozen features: heads, shallow hashers
and end-to-end training"): on one dataset and the small backbone, three kinds of rows in one table.

    python -m benchmarks.frozen_features_study --output_dir /tmp/frozen                  # digits, ~10 min
    python -m benchmarks.frozen_features_study --dataset fashion_mosaic --data_root /tmp/fm_root --subset 1000 \\
        --epochs 3 --output_dir /tmp/frozen                                                # ~9 min
    python -m benchmarks.frozen_features_study --losses hyp2 dpsh --hashers lsh itq --bits 8 --epochs 1 \\
        --subset 100 --output_dir /tmp/frozen_smoke                                        # smoke, ~1 min

1. End-to-end: every loss trains the whole network (benchmarks/compare.py, --epochs, one evaluation after the last).
2. The trunk: the end-to-end run of --trunk_loss at --trunk_bits (per seed) is frozen: its trunk (everything but the
   hash layer) gives every split's pooled features, cached once in OUTPUT_DIR/features (--feature_cache).
3. On those features: every loss trains a fresh hash head alone (compare.py --feature_cache --trunk_from, the same
   epochs), and every shallow hasher is fitted on the training split's features (docs/METHOD.md §12), not trained.

The trunk saw the training split only (as the hashers and the heads), never the queries. Runs are compare.py cells:
a finished one is reused, so an interrupted study resumes. Other arguments are retrieval.py flags for every run.
Tables: OUTPUT_DIR/frozen_features_{dataset}.md and .csv.
"""
import argparse
import csv
import io
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import compare  # noqa: E402
from data import DATASETS  # noqa: E402
from hashing.shallow import SHALLOW_HASHERS  # noqa: E402
from loss import LOSSES  # noqa: E402
from session.files import RunFiles  # noqa: E402
from utils.argtypes import positive_int, seed_value  # noqa: E402
from utils.atomic import write_text  # noqa: E402
from utils.errors import UserError, run_reporting_errors  # noqa: E402

KINDS = (("end_to_end", "yes (whole network)"), ("head", "yes (head only, frozen trunk)"),
         ("hasher", "no (fit only, frozen trunk)"))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=list(DATASETS), help="dataset")
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES), help="losses")
    parser.add_argument("--hashers", nargs="+", choices=list(SHALLOW_HASHERS), default=list(SHALLOW_HASHERS),
                        help="shallow hashers")
    parser.add_argument("--bits", nargs="+", type=positive_int, default=[16, 64], help="hash bits")
    parser.add_argument("--seeds", nargs="+", type=seed_value, default=[0], help="seeds (each seed its own trunk)")
    parser.add_argument("--epochs", type=positive_int, default=8, help="epochs of every end-to-end run and head")
    parser.add_argument("--trunk_loss", choices=list(LOSSES), default="hyp2",
                        help="the loss whose end-to-end run gives the frozen trunk")
    parser.add_argument("--trunk_bits", type=positive_int, default=None,
                        help="the code length of that run (default: the last of --bits)")
    parser.add_argument("--output_dir", default="./result", help="folder of the tables, the runs and the cache")
    parser.add_argument("--verbose", action="store_true", help="show each run's output")
    return parser


def parse(argv):
    """(the study's options, the retrieval.py flags for every run)."""
    options, flags = get_args_parser().parse_known_args(argv)
    options.trunk_bits = options.trunk_bits or options.bits[-1]
    if options.trunk_bits not in options.bits:
        raise UserError(f"--trunk_bits {options.trunk_bits} is not one of --bits {' '.join(map(str, options.bits))}: "
                        "the trunk is that end-to-end run's")
    return options, flags


def grid_argv(options, flags, output_dir, losses, seeds, *more):
    return ["--dataset", options.dataset, "--backbone", "small", "--losses", *losses,
            "--bits", *map(str, options.bits), "--seeds", *map(str, seeds), "--epochs", str(options.epochs),
            "--eval_every", str(options.epochs), "--output_dir", str(output_dir),
            *(["--verbose"] if options.verbose else []), *more, *flags]


def run_grid(argv):
    """compare.main on `argv`; UserError naming the failed cells."""
    summary = compare.main(argv)
    if summary["failed"]:
        raise UserError("cells failed: " + "; ".join(summary["failed"]))
    return summary["rows"]


def trunk_checkpoint(options, flags, seed):
    """The checkpoint of the end-to-end run whose trunk is frozen (a compare.py cell's)."""
    cell_options = compare.get_args_parser().parse_args(grid_argv(options, flags, Path(options.output_dir) /
                                                                   "end_to_end", [options.trunk_loss], [seed]))
    args = compare.cell_args(cell_options, options.trunk_loss, options.trunk_bits, seed)
    return RunFiles.for_args(args).checkpoint


def collect_maps(rows, kind, maps):
    """Add each row's per-seed mAPs to maps[(kind, name, bits)]."""
    for row in rows:
        if kind == "end_to_end" and row["loss"] in SHALLOW_HASHERS:
            continue
        row_kind = "hasher" if row["loss"] in SHALLOW_HASHERS else kind
        maps.setdefault((row_kind, row["loss"], row["hash_bit"]), []).extend(row.get("map_per_seed", []))


def study(options, flags):
    root = Path(options.output_dir)
    losses = list(dict.fromkeys([*options.losses, options.trunk_loss]))
    maps = {}
    collect_maps(run_grid(grid_argv(options, flags, root / "end_to_end", losses, options.seeds)), "end_to_end", maps)
    trunks = {}
    for seed in options.seeds:
        trunks[seed] = trunk_checkpoint(options, flags, seed)
        rows = run_grid(grid_argv(options, flags, root / f"frozen_seed{seed}", options.losses, [seed],
                                  "--feature_cache", str(root / "features"), "--trunk_from", str(trunks[seed]),
                                  "--hashers", *options.hashers))
        collect_maps(rows, "head", maps)
    return maps, trunks


def cell(values, best):
    if not values:
        return "—"
    mean = statistics.mean(values)
    text = f"{mean:.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")
    return f"**{text}**" if mean == best else text


def table_rows(options, maps):
    """[(kind, name, trained, {bits: [maps]})] in the table's order: end-to-end, heads, hashers."""
    names = {"end_to_end": options.losses, "head": options.losses, "hasher": options.hashers}
    return [(kind, name, trained, {bits: maps.get((kind, name, bits), []) for bits in options.bits})
            for kind, trained in KINDS for name in names[kind]]


def render_markdown(options, rows, trunks, command):
    best = {bits: max((statistics.mean(v[bits]) for *_, v in rows if v[bits]), default=None) for bits in options.bits}
    seeds = " ".join(map(str, options.seeds))
    lines = [f"# Frozen features: heads, shallow hashers and end-to-end training ({options.dataset}, small backbone)",
             "", f"mAP after {options.epochs} epochs (one evaluation after the last; the hashers: after fitting), "
             f"mean ± sample standard deviation over seeds {seeds}; best mean per column in bold. The frozen trunk "
             f"of each seed is that of its end-to-end {options.trunk_loss} run at {options.trunk_bits} bits "
             f"({', '.join(str(path) for path in trunks.values())}).", "",
             "| method | kind | trained | " + " | ".join(f"{bits} bits" for bits in options.bits) + " |",
             "|---|---|---|" + "---|" * len(options.bits)]
    for kind, name, trained, values in rows:
        lines.append(f"| {name} | {kind.replace('_', '-')} | {trained} | "
                     + " | ".join(cell(values[bits], best[bits]) for bits in options.bits) + " |")
    lines += ["", compare.threads_note(), "", f"Generated by `{compare.rerun_command(command)}`.", ""]
    return "\n".join(lines)


def render_csv(options, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "kind", "trained", "hash_bit", "runs", "map_mean", "map_std", "map_per_seed"])
    for kind, name, trained, values in rows:
        for bits in options.bits:
            maps = values[bits]
            writer.writerow([name, kind, trained, bits, len(maps), f"{statistics.mean(maps):.6f}" if maps else "",
                             f"{statistics.stdev(maps):.6f}" if len(maps) > 1 else "",
                             ";".join(f"{value:.6f}" for value in maps)])
    return buffer.getvalue()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    options, flags = parse(argv)
    maps, trunks = study(options, flags)
    rows = table_rows(options, maps)
    stem = Path(options.output_dir) / f"frozen_features_{options.dataset}"
    command = "python -m benchmarks.frozen_features_study " + shlex.join(argv)
    write_text(stem.with_suffix(".md"), render_markdown(options, rows, trunks, command))
    write_text(stem.with_suffix(".csv"), render_csv(options, rows))
    print(f"tables {stem}.md, {stem}.csv")
    return rows


def cli(argv=None):
    run_reporting_errors(lambda: main(argv), "; run the same command again to resume")


if __name__ == "__main__":
    cli()
