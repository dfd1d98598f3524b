"""Reproduce one of the paper's tables, cell by cell, with the paper's recipe (docs/METHOD.md §2, §5).

    python -m benchmarks.reproduce --table voc --dry_run                 # print the exact commands
    python -m benchmarks.reproduce --table voc                           # run every cell here, resumably
    python -m benchmarks.reproduce --table flickr_nus --bits 12 48 --losses hyp2 orthohash --seeds 0 1 2
    python -m benchmarks.reproduce --table voc --collect                 # only tabulate what has run

A cell is (dataset, bits, method); each runs once per --seeds value as `python retrieval.py ...` with the
recipe's flags written out (dry run prints exactly the commands that run, to paste onto a cluster, one per
GPU, or to prefix with `torchrun --nproc_per_node=N`). Runs go into OUTPUT_DIR/reproduce_{table}/{dataset}/
{method}_{bits}bit_seed{seed}/; a run whose log says finished with the same settings is reused, an
interrupted one resumes from its .last.pt. After every run the tables OUTPUT_DIR/reproduce_{table}.md and
.csv are rewritten: our mAP (mean ± sample std over the seeds), the paper's, the difference, the status.

Before training, each dataset with an unfinished run is fetched as retrieval.py fetches it (VOC's archives
downloaded, md5-checked and extracted); cells that still have no data are listed in the tables as "no data", and
the command ends with exit status 1 and one line saying what to get. --dry_run ends with the table's estimated
total in GPU-hours.

Any further retrieval.py flag (e.g. --amp, --cache, --workers 16, or --epochs 2 for a smoke test) goes to
every run after the recipe's, so it overrides the recipe; the tables list such changes.
"""
import argparse
import csv
import io
import shlex
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retrieval  # noqa: E402
from benchmarks import compare  # noqa: E402
from data import flickr, voc  # noqa: E402
from data.registry import check_available  # noqa: E402
from network import build_network, get_backbone  # noqa: E402
from utils.atomic import write_text  # noqa: E402
from utils.config import config_arguments, read_config  # noqa: E402
from utils.errors import UserError, run_reporting_errors  # noqa: E402
from utils.argtypes import positive_int, seed_value  # noqa: E402
from session.files import RunFiles  # noqa: E402

TABLES = {"flickr_nus": ("flickr", "nuswide"), "voc": ("voc2007", "voc2012")}

# docs/METHOD.md §2: the paper's training recipe per table, as a file (the backbone fixes the input size).
RECIPE_FILES = {"flickr_nus": "configs/paper/flickr_nus.yaml", "voc": "configs/paper/voc.yaml"}
ROOT = Path(__file__).resolve().parents[1]

# docs/METHOD.md §4: (train, query, database) sizes, for the time estimate.
SPLIT_SIZES = {"flickr": (4000, 1000, 19581), "nuswide": (10500, 2100, 193734),
               "voc2007": (5011, 4952, 5011), "voc2012": (5717, 5823, 5717)}

# The time estimate's assumptions: sustained training throughput of one modern GPU (an A100-class card
# under --amp reaches a fraction of its 312 TFLOP/s bf16 peak on these networks), and JPEG decoding rate.
ASSUMED_FLOPS_PER_SECOND = 50e12
ASSUMED_IMAGES_PER_SECOND = 1000

# Flags each command sets per run; given to the harness they are a mistake.
CELL_FLAGS = ("--dataset", "--hash_bit", "--loss", "--seed", "--output_dir", "--checkpoint", "--hierarchy",
              "--test", "--no_save", "--query", "--export_index", "--resume")


def recipe(dataset, data_root):
    """The paper's flags for a dataset: its table's recipe file (configs/paper/), the dataset's K, the data root."""
    table = next(name for name, datasets in TABLES.items() if dataset in datasets)
    path = RECIPE_FILES[table]
    from_file = config_arguments(retrieval.get_args_parser(), read_config(ROOT / path), path)
    return [*from_file, "--retrieve", str(compare.PAPER[dataset]["topk"]), "--data_root", data_root]


def data_problem(dataset, data_root, fetch=False):
    """None when the dataset's files are where retrieval.py looks for them, else the one-line fix. With `fetch`,
    the files are first fetched as a run fetches them (VOC's archives downloaded, checked and extracted), and the
    split lists read; without it, only what is on disk is looked at (a dry run, --collect)."""
    root = Path(data_root)
    if fetch:
        try:
            check_available(dataset, root)
        except UserError as exc:
            return str(exc)
        return None
    if dataset.startswith("voc"):
        year = dataset[3:]
        archives = [archive.file_name for archive in voc.ARCHIVES[year]]
        if (root / "VOCdevkit" / f"VOC{year}").is_dir() or all((root / name).exists() for name in archives):
            return None
        return (f"VOCdevkit/VOC{year} is not in {root} yet: running the table downloads and extracts "
                f"{' and '.join(archives)} there (README, Datasets)")
    if dataset == "flickr":
        found = (root / flickr.FOLDER).is_dir()
        return None if found else f"put MIRFlickr-25k into {root / flickr.FOLDER} (README, Datasets)"
    found = (root / "nus_wide" / "database.txt").exists()
    return None if found else (f"put NUS-WIDE's database.txt and images into {root / 'nus_wide'} (its train.txt "
                               "and test.txt ship in data/splits/; README, Datasets)")


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other arguments are retrieval.py flags for every run (after the recipe's, so they override it).")
    parser.add_argument("--table", required=True, choices=list(TABLES), help="which of the paper's tables")
    parser.add_argument("--bits", nargs="+", type=positive_int, default=None,
                        help="hash bits (default: the table's)")
    parser.add_argument("--losses", nargs="+", type=compare.parse_variant, default=None,
                        help="methods (default: the table's rows)")
    parser.add_argument("--seeds", nargs="+", type=seed_value, default=[0],
                        help="seeds; each cell runs once per seed")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and the time estimate only")
    parser.add_argument("--collect", action="store_true", help="run nothing: write the tables from the runs' logs")
    parser.add_argument("--output_dir", default="./result", help="folder of the tables and the runs")
    parser.add_argument("--data_root", default="./data", help="folder holding the datasets")
    parser.add_argument("--verbose", action="store_true", help="show each run's output")
    return parser


def parse(argv):
    """(options, the retrieval.py flags for every run)."""
    options, overrides = compare.parse_with_run_flags(get_args_parser(), argv, CELL_FLAGS, "reproduce",
                                                      "--table, --bits, --losses, --seeds, --output_dir")
    compare.distinct(options.seeds, "--seeds")
    compare.distinct(options.bits or [], "--bits")
    compare.distinct(options.losses or [], "--losses")
    return options, overrides


def table_cells(options):
    """[(dataset, bits, method)] of the table: the paper's bits and rows unless --bits/--losses say otherwise."""
    cells = []
    for dataset in TABLES[options.table]:
        paper = compare.PAPER[dataset]
        methods = options.losses or list(paper["map"])
        cells += [(dataset, bits, method) for bits in (options.bits or paper["bits"]) for method in methods]
    return cells


def run_folder(options, dataset, bits, method, seed):
    return Path(options.output_dir) / f"reproduce_{options.table}" / dataset / f"{method}_{bits}bit_seed{seed}"


def command(options, overrides, cell, seed):
    """retrieval.py's argv for one run of a cell: identity flags, the recipe, the overrides, the folder."""
    dataset, bits, method = cell
    loss, hierarchy = compare.split_variant(method)
    return ["--dataset", dataset, "--hash_bit", str(bits), "--loss", loss,
            *(["--hierarchy", str(hierarchy)] if hierarchy else []), "--seed", str(seed),
            *recipe(dataset, options.data_root), *overrides,
            "--output_dir", str(run_folder(options, dataset, bits, method, seed))]


@lru_cache(maxsize=None)
def forward_flops(backbone, input_size=None):
    """FLOPs of one image's forward pass (torch's FlopCounterMode, on the meta device: no memory, no weights),
    with a 48-bit hash layer: its share is below 0.01 % at any code length of the paper."""
    spec = get_backbone(backbone, input_size)
    with torch.device("meta"):
        network = build_network(spec, 48).eval()
        images = torch.empty(1, 3, spec.input_size, spec.input_size)
    with FlopCounterMode(display=False) as counter:
        network(images)
    return counter.get_total_flops()


def estimate_seconds(dataset, epochs=100, eval_every=5, backbone=None, input_size=None):
    """(compute seconds, image-reading seconds) of one run on one GPU under the assumptions above: training
    costs ~3 forward passes per image (forward and backward), each evaluation one per query and database image.
    The backbone is the paper's for the dataset unless given."""
    train, query, database = SPLIT_SIZES[dataset]
    flops = forward_flops(backbone or compare.PAPER[dataset]["backbone"], input_size)
    evaluations = epochs // eval_every + (epochs % eval_every != 0)
    images = epochs * train + evaluations * (query + database)
    compute = (epochs * train * 3 + evaluations * (query + database)) * flops / ASSUMED_FLOPS_PER_SECOND
    return compute, images / ASSUMED_IMAGES_PER_SECOND


def cell_status(options, overrides, cell, problem, failures):
    """(status, [finished run records]) of a cell over the seeds. Runs that finished count whether or not the data
    is here (they may have run on a cluster); a finished log that cannot be tabulated is named, not counted."""
    records, started, unusable = [], False, []
    for seed in options.seeds:
        args = retrieval.get_args_parser().parse_args(command(options, overrides, cell, seed))
        record, log_problem = compare.read_finished(args)
        records += [record] if record else []
        unusable += [f"seed {seed}: {log_problem}"] if log_problem else []
        started |= record is None and not log_problem and RunFiles.for_args(args).event_log.exists()
    done = f"({len(records)}/{len(options.seeds)} seeds done)"
    if unusable:
        return f"unusable log ({'; '.join(unusable)}) {done}", records
    if len(records) == len(options.seeds):
        return "ok", records
    if problem:
        return f"no data: {problem} {done}", records
    if cell in failures:
        return f"failed: {failures[cell]}", records
    return ("running" if started else "not run") + f" {done}", records


def table_rows(options, overrides, problems, failures):
    rows = []
    for cell in table_cells(options):
        dataset, bits, method = cell
        status, records = cell_status(options, overrides, cell, problems[dataset], failures)
        maps = [compare.reported_map(record) for record in records]
        mean, std = compare.summarise(maps) if maps else (None, None)
        paper = compare.paper_map(dataset, method, bits)
        rows.append({"dataset": dataset, "hash_bit": bits, "method": method, "map_mean": mean, "map_std": std,
                     "seeds": len(maps), "map_per_seed": maps, "paper_map": paper,
                     "difference": None if mean is None or paper is None else mean - paper, "status": status,
                     "data_files": compare.data_files_text(records)})
    return rows


def format_ours(row):
    if row["map_mean"] is None:
        return "—"
    spread = f" ± {row['map_std']:.3f}" if row["map_std"] is not None else ""
    return f"{row['map_mean']:.3f}{spread} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"


def render_markdown(options, overrides, rows, invocation):
    first = retrieval.get_args_parser().parse_args(command(options, overrides, table_cells(options)[0], 0))
    lines = [f"# Paper table: {', '.join(TABLES[options.table])}", "",
             f"mAP@K ({compare.describe_selection(first)}; `--select {first.select}`), "
             "mean ± sample standard deviation over seeds "
             f"{' '.join(map(str, options.seeds))}; difference = ours − paper (the paper's HashNet figures are "
             "HashNet's own, not re-run by the HyP² authors: docs/METHOD.md §5).", "",
             "Recipe (docs/METHOD.md §2): " + "; ".join(f"{dataset} `{shlex.join(recipe(dataset, options.data_root))}`"
                                                       for dataset in TABLES[options.table]) + ".", ""]
    if overrides:
        lines += [f"Changed for every run: `{shlex.join(overrides)}` (so not the paper's recipe).", ""]
    lines += ["| dataset | bits | method | ours | paper | difference | status | data files |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        paper = "—" if row["paper_map"] is None else f"{row['paper_map']:.3f}"
        difference = "—" if row["difference"] is None else f"{row['difference']:+.3f}"
        lines.append(f"| {row['dataset']} | {row['hash_bit']} | {row['method']} | {format_ours(row)} | {paper} | "
                     f"{difference} | {row['status']} | {row['data_files'] or '—'} |")
    return "\n".join(lines + ["", compare.threads_note(), "", f"Generated by `{compare.rerun_command(invocation)}`.",
                               ""])


CSV_COLUMNS = ["dataset", "hash_bit", "method", "map_mean", "map_std", "seeds", "map_per_seed", "paper_map",
               "difference", "status", "threads", "data_files"]


def render_csv(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {key: ("" if row.get(key) is None else row[key]) for key in CSV_COLUMNS}
        cells["map_per_seed"] = ";".join(f"{value:.6f}" for value in row["map_per_seed"])
        cells["threads"] = torch.get_num_threads()
        writer.writerow(cells)
    return buffer.getvalue()


def write_tables(options, overrides, problems, failures, invocation):
    rows = table_rows(options, overrides, problems, failures)
    stem = Path(options.output_dir) / f"reproduce_{options.table}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_text(stem.with_suffix(".md"), render_markdown(options, overrides, rows, invocation))
    write_text(stem.with_suffix(".csv"), render_csv(rows))
    return rows, stem


def print_commands(options, overrides, problems):
    """--dry_run: every run's command, and per dataset and bits the estimated time of one run."""
    for cell in table_cells(options):
        for seed in options.seeds:
            print(shlex.join(["python", "retrieval.py", *command(options, overrides, cell, seed)]))
    print(f"# estimated time per run on one GPU ({ASSUMED_FLOPS_PER_SECOND / 1e12:.0f} TFLOP/s sustained, "
          f"{ASSUMED_IMAGES_PER_SECOND} JPEGs/s decoded; an estimate from FLOPs, not a measurement):", file=sys.stderr)
    per_run = {}
    for dataset in TABLES[options.table]:
        run = retrieval.get_args_parser().parse_args(command(options, overrides, (dataset, 16, "hyp2"), 0))
        compute, reading = estimate_seconds(dataset, run.epochs, run.eval_every, run.backbone, run.input_size)
        per_run[dataset] = max(compute, reading)  # decoding overlaps the compute: the longer sets the pace
        print(f"#   {dataset}: compute {compute / 60:.0f} min, image decoding {reading / 60:.0f} min"
              + (f"  [no data: {problems[dataset]}]" if problems[dataset] else ""), file=sys.stderr)
    cells = table_cells(options)
    hours = sum(per_run[dataset] for dataset, _, _ in cells) / 3600
    print(f"# total: {len(cells)} runs per seed, ~{hours:.1f} GPU-hours per seed (each run the longer of its compute "
          f"and its decoding, which overlap); {len(options.seeds)} seed{'s' if len(options.seeds) > 1 else ''}: "
          f"~{hours * len(options.seeds):.1f} GPU-hours", file=sys.stderr)


def run_cells(options, overrides, problems, invocation):
    """Train every run that has not finished (resuming interrupted ones); returns {cell: error} of failures."""
    failures = {}
    for cell in table_cells(options):
        if problems[cell[0]]:
            continue
        for seed in options.seeds:
            args = retrieval.get_args_parser().parse_args(command(options, overrides, cell, seed))
            if compare.finished_record(args) is not None:
                continue
            print(f"{' '.join(map(str, cell))} seed {seed}: training", file=sys.stderr)
            error = compare.train_or_resume(args, options.verbose)
            if error:
                failures[cell] = error
                print(f"failed: {error}", file=sys.stderr)
            write_tables(options, overrides, problems, failures, invocation)
    return failures


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    options, overrides = parse(argv)
    retrieval.get_args_parser().parse_args(command(options, overrides, table_cells(options)[0], 0))  # check flags
    invocation = shlex.join(["python", "-m", "benchmarks.reproduce", *argv])
    fetch = not (options.dry_run or options.collect)
    problems = {dataset: data_problem(dataset, options.data_root, fetch and unfinished(options, overrides, dataset))
                for dataset in TABLES[options.table]}
    if options.dry_run:
        print_commands(options, overrides, problems)
        return {"rows": None}
    started = time.perf_counter()
    failures = {} if options.collect else run_cells(options, overrides, problems, invocation)
    rows, stem = write_tables(options, overrides, problems, failures, invocation)
    done = sum(row["status"] == "ok" for row in rows)
    without_data = [row for row in rows if row["status"].startswith("no data")]
    print(f"{done}/{len(rows)} cells done, {len(failures)} failed, {len(without_data)} without data, in "
          f"{time.perf_counter() - started:.0f}s; tables {stem}.md, {stem}.csv")
    missing = None
    if without_data and not options.collect:
        datasets = dict.fromkeys(row["dataset"] for row in without_data)
        missing = (f"{len(without_data)} of {len(rows)} cells did not run for want of data: "
                   + "; ".join(f"{dataset}: {problems[dataset]}" for dataset in datasets))
    return {"rows": rows, "failures": failures, "missing_data": missing}


def unfinished(options, overrides, dataset):
    """Whether a run of the dataset's cells has not finished (so its data is needed here)."""
    return any(compare.finished_record(retrieval.get_args_parser().parse_args(command(options, overrides, cell, seed)))
               is None for cell in table_cells(options) if cell[0] == dataset for seed in options.seeds)


def cli(argv=None):
    summary = run_reporting_errors(lambda: main(argv), "; run the same command again to resume")
    if summary.get("missing_data"):
        print(f"error: {summary['missing_data']}", file=sys.stderr)
    sys.exit(1 if summary.get("failures") or summary.get("missing_data") else 0)


if __name__ == "__main__":
    cli()
