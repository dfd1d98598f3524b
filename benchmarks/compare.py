"""Compare losses on one dataset and backbone: a grid of losses x hash bits x seeds, each cell a full
training run of retrieval.py, summarised in OUTPUT_DIR/compare_{dataset}_{backbone}.md and .csv.

    python benchmarks/compare.py                                   # the digits table of docs/STUDIES.md (~25 min)
    python benchmarks/compare.py --losses hyp2 dpsh --bits 16 32 --seeds 0
    python benchmarks/compare.py --dataset voc2007 --backbone googlenet --bits 16 32 48 64 --epochs 100 \\
        --eval_every 5 --losses hyp2 orthohash proxy_anchor idhn dhn
    python benchmarks/compare.py ... --lr 0.01 --hhf_alpha 8       # any retrieval.py flag goes to every cell
    python benchmarks/compare.py --losses dpsh dhn csq --bits 24 --seeds 0 1 2 --baseline_recipe both
    python benchmarks/compare.py --feature_cache /tmp/features   # heads on a frozen trunk + the shallow hashers

Losses are the names of `--loss`, or NAME_hplK for NAME with hierarchical proxies of K clusters. Each
cell trains in-process into OUTPUT_DIR/compare_{dataset}_{backbone}/{loss}_{bits}bit_seed{seed}/ with
its own logs and checkpoint. A cell whose JSON log is finished with the same settings is reused, so an
interrupted or extended grid resumes instead of starting over. The tables are rewritten (atomically)
after every cell.

With `--unseen_classes` (retrieval of unseen classes, docs/METHOD.md §13) the grid and its tables are
compare_{dataset}_{backbone}_unseen{classes}, and the tables add each cell's mAP by seen-class, unseen-class
and all-label relevance.

`--feature_cache DIR` compares on one frozen trunk (--freeze_backbone is added): every loss trains a hash head on
the trunk's cached features, and every shallow hasher of --hashers (default: all) is fitted on the same training
features (docs/METHOD.md §12), its own row; the tables' `trained` column tells the two apart.

`--baseline_recipe authors` runs each baseline that has an authors' recipe (configs/authors/, see
authors_recipe) with that file's flags, in rows labelled NAME_authors; `both` runs it both ways, so the
table shows the two side by side. The recipe overrides the flags given to the whole grid; a loss's
--loss_args come after it and win.

The digits defaults (10 epochs, one evaluation at the end) fit the 66-run grid into ~25 minutes on a
quiet 2-core CPU (a run takes ~23 s with data generation and evaluation), inside a 40-minute budget.
"""
import argparse
import contextlib
import csv
import datetime
import io
import math
import numbers
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retrieval  # noqa: E402
from data import DataOptions  # noqa: E402
from data.registry import check_available  # noqa: E402
from hashing.evaluation.class_split import DEFINITIONS  # noqa: E402
from hashing.shallow import SHALLOW_HASHERS  # noqa: E402
from loss import LOSSES, PROXY_LOSSES  # noqa: E402
from utils.atomic import write_text  # noqa: E402
from utils.config import config_arguments, read_config  # noqa: E402
from utils.errors import TrainingInterrupted, UserError, run_reporting_errors  # noqa: E402
from utils.runlog import read_run_log  # noqa: E402
from utils.argtypes import positive_int, seed_value  # noqa: E402
from session.files import RunFiles  # noqa: E402
from session.parts import validation_size  # noqa: E402

DEFAULT_LOSSES = [*LOSSES, "hyp2_hpl4"]

# docs/METHOD.md §5: the paper's mAP@K (HyP2 and the baselines it reproduced), by dataset.
PAPER = {
    "flickr": {"backbone": "alexnet", "topk": 1000, "bits": (12, 24, 36, 48), "map": {
        "hyp2": (.845, .881, .893, .901), "orthohash": (.837, .869, .877, .891),
        "proxy_anchor": (.796, .831, .834, .853), "csq": (.795, .819, .849, .857),
        "idhn": (.827, .823, .822, .828), "dhn": (.817, .831, .829, .851), "hashnet": (.791, .826, .841, .848)}},
    "nuswide": {"backbone": "alexnet", "topk": 5000, "bits": (12, 24, 36, 48), "map": {
        "hyp2": (.794, .822, .831, .843), "orthohash": (.770, .802, .810, .825),
        "proxy_anchor": (.767, .802, .809, .815), "csq": (.692, .754, .757, .769),
        "idhn": (.772, .790, .795, .803), "dhn": (.720, .742, .741, .749), "hashnet": (.643, .694, .737, .750)}},
    "voc2007": {"backbone": "googlenet", "topk": 5011, "bits": (16, 32, 48, 64), "map": {
        "hyp2": (.862, .917, .932, .937), "orthohash": (.831, .876, .902, .909),
        "proxy_anchor": (.752, .802, .836, .841), "idhn": (.772, .801, .796, .772), "dhn": (.735, .743, .737, .728)}},
    "voc2012": {"backbone": "googlenet", "topk": 5717, "bits": (16, 32, 48, 64), "map": {
        "hyp2": (.841, .903, .917, .925), "orthohash": (.823, .885, .893, .900),
        "proxy_anchor": (.722, .795, .804, .823), "idhn": (.785, .805, .797, .785), "dhn": (.722, .721, .718, .701)}},
}

# The grid's own flags, which are not retrieval.py's.
GRID_FLAGS = {"losses", "bits", "seeds", "loss_args", "baseline_recipe", "verbose", "hashers"}

AUTHORS_RECIPES = Path(__file__).resolve().parents[1] / "configs" / "authors"
AUTHORS_SUFFIX = "_authors"  # the label of a row run with its authors' recipe: NAME_authors
# The baselines whose authors ran them otherwise than the project's defaults do (docs/METHOD.md §6).
RECIPE_LOSSES = ("csq", "dhn", "dpsh", "hashnet", "proxy_anchor")

# Settings that do not change a cell's result, so a finished cell with other values is still reused. `resume` and
# `overwrite` say how a run was started: a cell resumed by train_or_resume records `resume: ""`, and a resume
# replays an uninterrupted run's batches exactly.
NOT_SETTINGS = {"output_dir", "checkpoint", "device", "cuda", "workers", "data_root", "no_progress", "resume",
                "overwrite"}


def paper_map(dataset, loss, bits):
    loss = split_label(loss)[0]
    table = PAPER.get(dataset)
    if table is None or bits not in table["bits"] or loss not in table["map"]:
        return None
    return table["map"][loss][table["bits"].index(bits)]


def split_variant(variant):
    """'hyp2' -> ('hyp2', 0); 'proxy_anchor_hpl4' -> ('proxy_anchor', 4)."""
    loss, hierarchy = re.fullmatch(r"(.+?)(?:_hpl(\d+))?", variant).groups()
    return loss, int(hierarchy or 0)


def authors_recipe(loss, backbone, bits):
    """The recipe file of `loss` as its authors ran it (docs/METHOD.md §6), or None for the losses whose
    references differ from ours on degenerate inputs only (hyp2, hhf, dch, idhn, orthohash). CSQ's
    authors tuned its quantisation weight per backbone: AlexNet's file below 64 bits, AlexNet's 64-bit
    one from 64 bits, and ResNet-50's for every other backbone."""
    if loss not in RECIPE_LOSSES:
        return None
    if loss == "csq":
        loss = "csq_resnet" if backbone != "alexnet" else "csq_alexnet_64bit" if bits >= 64 else "csq_alexnet"
    return AUTHORS_RECIPES / f"{loss}.yaml"


def recipe_flags(path, loss):
    """retrieval.py's argv for a recipe file's values ("--csq_quantization", "0.05", ...); its `loss`, if
    any, must be `loss` (the grid sets --loss per cell)."""
    values = dict(read_config(path))
    named = values.pop("loss", loss)
    if named != loss:
        raise UserError(f"recipe file {path} is for --loss {named}, not {loss}")
    return config_arguments(retrieval.get_args_parser(), values, path)


def split_label(label):
    """'dpsh_authors' -> ('dpsh', True): a row's variant and whether it runs its authors' recipe."""
    if label.endswith(AUTHORS_SUFFIX):
        return label[:-len(AUTHORS_SUFFIX)], True
    return label, False


def row_labels(variants, baseline_recipe):
    """The table's rows: each variant as ours (`ours`), as its authors' where they have a recipe
    (`authors`), or both."""
    labels = []
    for variant in variants:
        has_recipe = split_variant(variant)[0] in RECIPE_LOSSES
        if baseline_recipe != "authors" or not has_recipe:
            labels.append(variant)
        if baseline_recipe != "ours" and has_recipe:
            labels.append(variant + AUTHORS_SUFFIX)
    return labels


def parse_variant(variant):
    """argparse type of --losses: a loss name, or NAME_hplK for a proxy loss with hierarchical proxies."""
    loss, hierarchy = split_variant(variant)
    if loss not in LOSSES:
        raise argparse.ArgumentTypeError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)} (or NAME_hplK)")
    if hierarchy and loss not in PROXY_LOSSES:
        raise argparse.ArgumentTypeError(f"{variant}: hierarchical proxies need one of {', '.join(PROXY_LOSSES)}")
    return variant


# retrieval.py flags that the grid sets per cell (or that would stop a cell from training).
GRID_OWNED = ("loss", "hierarchy", "hash_bit", "seed", "test", "no_save", "checkpoint", "query", "export_index",
              "hasher")


def get_args_parser():
    """The grid's flags on top of every retrieval.py flag, which reach every cell (--output_dir is the
    folder of the tables and the cells' runs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[retrieval.get_args_parser(add_help=False)])
    grid = parser.add_argument_group("the grid")
    grid.add_argument("--losses", nargs="+", type=parse_variant, default=DEFAULT_LOSSES,
                      help=f"losses to compare (default: {' '.join(DEFAULT_LOSSES)})")
    grid.add_argument("--bits", nargs="+", type=positive_int, default=[12, 24, 48], help="hash bits")
    grid.add_argument("--seeds", nargs="+", type=seed_value, default=[0, 1], help="seeds (each cell is run per seed)")
    grid.add_argument("--loss_args", action="append", type=parse_loss_args, default=[], metavar="LOSS=FLAGS",
                      help="retrieval.py flags for one loss of the grid only, e.g. proxy_anchor='--lr 0.005' "
                           "(repeatable; the tables list them)")
    grid.add_argument("--baseline_recipe", choices=["ours", "authors", "both"], default="ours",
                      help="run the baselines with the project's defaults (ours), with their authors' recipe "
                           "files of configs/authors/ (authors, rows NAME_authors), or both side by side")
    grid.add_argument("--hashers", nargs="*", choices=list(SHALLOW_HASHERS), default=None, metavar="HASHER",
                      help="shallow hashers as rows besides the losses, fitted on the frozen trunk's training features "
                           f"and not trained ({', '.join(SHALLOW_HASHERS)}); default: all of them with "
                           "--feature_cache, none otherwise")
    grid.add_argument("--verbose", action="store_true", help="show each run's output")
    # The digits table's budget: 10 epochs, one evaluation at the end.
    parser.set_defaults(dataset="digits", backbone="small", epochs=10, eval_every=10,
                        **{flag: None for flag in GRID_OWNED})
    return parser


def parse_loss_args(text):
    """argparse type of --loss_args: 'proxy_anchor=--lr 0.005' -> ('proxy_anchor', ['--lr', '0.005'])."""
    variant, separator, flags = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"expected LOSS=FLAGS, got {text!r}")
    return parse_variant(variant), shlex.split(flags)


def parse_with_run_flags(parser, argv, flags_set_per_run, harness, instead):
    """(the harness's options, the retrieval.py flags it passes to every run); a flag the harness sets per run
    is refused with the harness's own option to use `instead`."""
    options, overrides = parser.parse_known_args(argv)
    given = sorted({token.split("=")[0] for token in overrides} & set(flags_set_per_run))
    if given:
        raise UserError(f"{harness} sets {', '.join(given)} per run: use {instead}")
    if "--config" in overrides or getattr(options, "config", None):
        raise UserError(f"{harness} takes a recipe's flags themselves, not --config (a harness's runs take their "
                        "recipes from its own options and files); e.g. --optimizer adamw --lr 0.001")
    return options, overrides


def refuse_grid_owned(options):
    """The grid sets these per cell: a value for all cells is a mistake."""
    if options.config:
        raise UserError("compare.py takes a recipe's flags themselves, not --config (each row's recipe is its own: "
                        "--loss_args, --baseline_recipe); e.g. --optimizer adamw --lr 0.001")
    given = [flag for flag in GRID_OWNED if getattr(options, flag) not in (None, False)]
    if given:
        raise UserError(f"compare.py may not be given --{', --'.join(given)}: the grid sets --loss, --hierarchy, "
                        "--hash_bit and --seed per cell (use --losses, --bits, --seeds) and every cell trains")


def grid_name(options):
    """compare_{dataset}_{backbone}, with _unseen{classes} under --unseen_classes (another grid, other tables)."""
    unseen = getattr(options, "unseen_classes", None)
    held_out = "_unseen" + re.sub(r"[^A-Za-z0-9.]+", "-", " ".join(unseen).strip()) if unseen else ""
    return f"compare_{options.dataset}_{options.backbone}{held_out}"


def grid_root(options):
    return Path(options.output_dir) / grid_name(options)


def cell_args(options, label, bits, seed, extra=()):
    """retrieval.py's parsed arguments for one cell: the grid's flags, then for a NAME_authors row its
    authors' recipe, then `extra` (that loss's --loss_args)."""
    variant, authors = split_label(label)
    loss, hierarchy = split_variant(variant)
    if authors:
        extra = [*recipe_flags(authors_recipe(loss, options.backbone, bits), loss), *extra]
    output_dir = grid_root(options) / f"{label}_{bits}bit_seed{seed}"
    owned = dict(loss=loss, hierarchy=hierarchy, hash_bit=bits, seed=seed, output_dir=str(output_dir), test=False,
                 no_save=False, overwrite=True, checkpoint=None, query=None, export_index=None)
    settings = {key: value for key, value in vars(options).items() if key not in GRID_FLAGS}
    args = retrieval.get_args_parser().parse_args(list(extra), namespace=argparse.Namespace(**{**settings, **owned}))
    if any(getattr(args, key) != value for key, value in owned.items()):
        raise UserError("the per-loss flags may not set --test, --no_save, --checkpoint, --output_dir, --query, "
                        "--export_index or what the grid sets (--loss, --hierarchy, --hash_bit, --seed: use --losses, "
                        "--bits, --seeds)")
    return args


def hasher_cell_args(options, hasher, bits, seed):
    """retrieval.py's parsed arguments for a shallow hasher's cell: fitted, not trained (--hasher)."""
    args = cell_args(options, "hyp2", bits, seed)
    args.hasher, args.output_dir = hasher, str(grid_root(options) / f"{hasher}_{bits}bit_seed{seed}")
    return args


def shallow_rows(options):
    """The shallow hashers the grid fits (--hashers; all with --feature_cache), with their flags checked; a
    --feature_cache grid trains the losses as heads on the frozen trunk (--freeze_backbone)."""
    hashers = options.hashers if options.hashers is not None else list(SHALLOW_HASHERS) if options.feature_cache else []
    if options.feature_cache:
        options.freeze_backbone = True
    if hashers and not options.freeze_backbone:
        raise UserError("--hashers fit on a frozen trunk's features: add --freeze_backbone (the losses then train "
                        "heads on it too) or --feature_cache DIR")
    return distinct(hashers, "--hashers")


def trained_text(options, label):
    """The table's `trained` cell: what a row's runs trained."""
    if label in SHALLOW_HASHERS:
        return "no (fit only)"
    return "yes (head only)" if getattr(options, "freeze_backbone", False) else "yes"


def distinct(values, flag):
    """`values` of a list flag, refused when one is listed twice: a seed listed twice is one run counted twice
    (a "± 0.000 over 3 seeds" from one run), a code length twice the same column."""
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        raise UserError(f"{flag} lists {', '.join(map(str, repeated))} more than once: each "
                        f"{'seed is one run' if flag == '--seeds' else 'value is one column'}; list each once")
    return values


def threads_note():
    """The table line that says how many CPU threads the runs used: seeded results depend on it."""
    count = torch.get_num_threads()
    return (f"Ran with {count} CPU thread{'s' if count != 1 else ''} (torch.get_num_threads()); seeded results "
            "change with the thread count, so the command below sets it.")


def rerun_command(command):
    """`command` (a string) prefixed with the thread count it ran with, to reproduce the tables to the digit."""
    return f"OMP_NUM_THREADS={torch.get_num_threads()} {command}"


def generated_lines(command):
    """The lines that close a study's table: the thread count and the dated command that reruns it."""
    return [threads_note(), "", f"Generated {datetime.date.today().isoformat()} by `{rerun_command(command)}`.", ""]


def log_problem(record):
    """Why a finished run's record cannot be tabulated (None when it can): a log without the run's start event or
    settings, or whose mAP and seconds are not numbers (a damaged or hand-made log)."""
    def number(value, low=0.0, high=math.inf):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and low <= value <= high

    if not isinstance(record.get("args"), dict):
        return "no start event with the run's settings"
    if not isinstance(record.get("best"), dict) or not number(reported_map(record), high=1.0):
        return "its mAP is not a number between 0 and 1"
    if not number(record.get("train_seconds")) or not all(number(entry.get("map", 0.0), high=1.0)
                                                          for entry in record["epochs"]):
        return "its epochs are not numbers"
    return None


def read_finished(args):
    """(the cell's run log (read_run_log) if it finished with these settings and can be tabulated, else None;
    why a finished log cannot be tabulated, else None)."""
    try:
        record = read_run_log(RunFiles.for_args(args).event_log)
    except (OSError, UserError):  # no log (or none that is a regular file): the run has not finished here
        return None, None
    if not record.get("finished") or not record.get("best"):
        return None, None
    problem = log_problem(record)
    if problem:
        return None, problem
    recorded = record["args"]
    same = all(recorded[key] == value for key, value in vars(args).items()
               if key in recorded and key not in NOT_SETTINGS)
    return (record if same else None), None


def finished_record(args):
    """The cell's run log if it finished with these settings (read_finished), else None."""
    return read_finished(args)[0]


def describe_cell(args):
    hierarchy = f"_hpl{args.hierarchy}" if getattr(args, "hierarchy", 0) else ""
    row = getattr(args, "hasher", None) or f"{args.loss}{hierarchy}"
    return f"the cell {row} {args.hash_bit} bits seed {args.seed} ({args.output_dir})"


def run_cell(args, verbose):
    """Train one cell in-process; returns None on success, else the one-line error. Ctrl-C stops the harness
    (TrainingInterrupted naming the cell) instead of counting as one failed cell."""
    quiet = contextlib.ExitStack()
    if not verbose:
        sink = io.StringIO()
        quiet.enter_context(contextlib.redirect_stdout(sink))
        quiet.enter_context(contextlib.redirect_stderr(sink))
    try:
        with quiet:
            retrieval.main(args)
    except TrainingInterrupted as exc:
        raise TrainingInterrupted(f"{describe_cell(args)} was interrupted: {exc}") from None
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"{describe_cell(args)} was interrupted; run the same command again to "
                                  "resume") from None
    except UserError as exc:
        return str(exc)
    return None


def train_or_resume(args, verbose):
    """run_cell, continuing from the run's training state when an earlier attempt was interrupted."""
    if RunFiles.for_args(args).last.exists():
        args.resume = ""
    return run_cell(args, verbose)


def summarise(values):
    """(mean, sample standard deviation or None for a single value) of a non-empty list."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def collect(cells):
    """{(variant, bits): [finished records]} over the grid's cells."""
    results = {}
    for (variant, bits, _seed), args in cells.items():
        record = finished_record(args)
        results.setdefault((variant, bits), [])
        if record is not None:
            results[(variant, bits)].append(record)
    return results


def final_map(record):
    """The test-query mAP after the last evaluation (under --select val, only the kept epoch has one)."""
    maps = [entry["map"] for entry in record["epochs"] if "map" in entry]
    return maps[-1] if maps else reported_map(record)


def reported_map(record):
    """The kept checkpoint's test-query mAP; logs of runs before --select recorded it as the best map."""
    return record.get("test_map", record["best"]["map"])


def describe_selection(options):
    """How the grid's cells choose their checkpoint (--select; "test" when absent, as before the flag), for
    the tables."""
    select = getattr(options, "select", "test")
    if select == "val":
        return (f"epoch selected on {validation_size(options)} validation items held out "
                "from the training set, then evaluated once on the test queries")
    if select == "last" or options.eval_every >= options.epochs:
        return "after the last epoch"
    return (f"best of the evaluations every {options.eval_every} epochs and after the last, "
            "selected on the test queries as in the paper")


def data_files_text(records):
    """What the runs' logs record of their data files ("data_files": e.g. coco's split variant, NUS-WIDE's
    database.txt), distinct descriptions joined by " | "; "" when they record none."""
    described = {"; ".join(f"{name} {value}" for name, value in (record.get("data_files") or {}).items())
                 for record in records}
    return " | ".join(sorted(filter(None, described)))


def data_files_lines(rows):
    """The markdown lines naming the rows' data files: one line when every row has the same, else per row."""
    described = {row.get("data_files") for row in rows if row.get("data_files")}
    if len(described) == 1:
        return [f"Data files (from the run logs): {described.pop()}.", ""]
    if described:
        return ["Data files differ between cells: " + "; ".join(
            f"{row['loss']} {row['hash_bit']} bits: {row['data_files']}" for row in rows if row.get("data_files"))
            + ".", ""]
    return []


def table_rows(options, variants, results):
    """One row per (loss, bits) with the statistics the tables show."""
    rows = []
    for variant in variants:
        for bits in options.bits:
            records = results[(variant, bits)]
            row = {"loss": variant, "hash_bit": bits, "runs": len(records), "trained": trained_text(options, variant),
                   "select": getattr(options, "select", "test"),
                   "paper_map": paper_map(options.dataset, variant, bits)}
            if records:
                maps = [reported_map(r) for r in records]
                row["map_mean"], row["map_std"] = summarise(maps)
                row["map_per_seed"] = maps
                row["final_map_mean"] = statistics.mean(final_map(r) for r in records)
                row["train_seconds_mean"] = statistics.mean(r["train_seconds"] for r in records)
                row["topk"] = records[0]["topk"]
                row["data_files"] = data_files_text(records)
                row.update(class_split_statistics(records))
            rows.append(row)
    return rows


def class_split_statistics(records):
    """{"seen_map_mean", "seen_map_std", "unseen_...", "all_...": ...} over the records of an --unseen_classes
    grid (their "class_split_map"); {} when a record has none."""
    split_maps = [record.get("class_split_map") for record in records]
    if not all(isinstance(maps, dict) for maps in split_maps):
        return {}
    statistics_ = {}
    for name in DEFINITIONS:
        values = [maps.get(name, {}).get("map") for maps in split_maps]
        values = [value for value in values if isinstance(value, numbers.Real)]
        statistics_[f"{name}_map_mean"], statistics_[f"{name}_map_std"] = summarise(values) if values else (None, None)
    return statistics_


def class_split_table(options, variants, by_cell):
    """The markdown lines of the seen / unseen / all-label mAPs of an --unseen_classes grid ([] otherwise)."""
    if not any(by_cell[key].get("seen_map_mean") is not None for key in by_cell):
        return []

    def cell(row, name):
        mean, std = row.get(f"{name}_map_mean"), row.get(f"{name}_map_std")
        return "—" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
    columns = [(bits, name) for bits in options.bits for name in DEFINITIONS]
    lines = ["", "Under --unseen_classes the table above is the seen-class mAP, which training selects by (as "
             "DSH_Analysis does).", "", f"mAP by relevance, unseen classes `{' '.join(options.unseen_classes)}` (docs/METHOD.md §13): "
             "seen = by the seen classes' labels only, unseen = by the unseen classes' only, all = every label"
             + (" (a fraction's classes are drawn per seed)" if len(options.unseen_classes) == 1
                and "." in options.unseen_classes[0] else "") + ":", "",
             "| loss | " + " | ".join(f"{bits} bits {name}" for bits, name in columns) + " |",
             "|---|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join([variant] + [cell(by_cell[(variant, bits)], name) for bits, name in columns])
                    + " |" for variant in variants]


def format_map(row, best):
    if not row["runs"]:
        return "—"
    text = f"{row['map_mean']:.4f}" + (f" ± {row['map_std']:.4f}" if row["map_std"] is not None else "")
    if row["map_mean"] == best:
        text = f"**{text}**"
    if row["paper_map"] is not None:
        text += f" (paper {row['paper_map']:.3f})"
    return text


def describe_recipes(options, labels):
    """'csq `--csq_quantization 0.05` (csq_resnet.yaml)', ... for the table's NAME_authors rows."""
    described = []
    for label in labels:
        variant, authors = split_label(label)
        loss = split_variant(variant)[0]
        files = dict.fromkeys(authors_recipe(loss, options.backbone, bits) for bits in options.bits) if authors else {}
        described += [f"{loss} `{shlex.join(recipe_flags(path, loss))}` ({path.name})" for path in files]
    return list(dict.fromkeys(described))


def frozen_trunk_lines(options, variants):
    """What a grid over a frozen trunk trained, for the table's header: the heads and the fitted hashers."""
    if not getattr(options, "freeze_backbone", False):
        return []
    source = f"cached in {options.feature_cache}" if options.feature_cache else "computed by the frozen trunk"
    trunk = f", the trunk from {options.trunk_from}" if options.trunk_from else ""
    hashers = [variant for variant in variants if variant in SHALLOW_HASHERS]
    return [f"Frozen trunk{trunk}: the losses train the hash head alone on its pooled features ({source})"
            + (f"; the shallow hashers ({', '.join(hashers)}) are fitted on the training split's features, "
               "nothing trained (docs/METHOD.md §12); their seconds are the fit's" if hashers else "") + ".", ""]


def render_markdown(options, variants, rows, command):
    by_cell = {(row["loss"], row["hash_bit"]): row for row in rows}
    done = [row for row in rows if row["runs"]]
    best = {bits: max((row["map_mean"] for row in done if row["hash_bit"] == bits), default=None)
            for bits in options.bits}
    topk = done[0]["topk"] if done else "K"
    with_trained = any(variant in SHALLOW_HASHERS for variant in variants) or getattr(options, "freeze_backbone",
                                                                                      False)
    header = ("| loss | " + ("trained | " if with_trained else "") + " | ".join(f"{bits} bits" for bits in options.bits)
              + " |")
    rule = "|---|" + "---|" * (len(options.bits) + with_trained)

    def first(variant):
        return variant + (f" | {trained_text(options, variant)}" if with_trained else "")
    evaluated = describe_selection(options)
    seeds = f"seed{'s' if len(options.seeds) > 1 else ''} {' '.join(map(str, options.seeds))}"
    lines = [f"# Loss comparison: {options.dataset} / {options.backbone}", "",
             f"mAP@{topk} ({evaluated}), mean ± sample standard deviation over {seeds}; "
             f"training epochs: {options.epochs}{f', first {options.subset} images of each split' if options.subset else ''}; "
             f"best mean per column in bold; {sum(row['runs'] for row in rows)} of "
             f"{len(rows) * len(options.seeds)} runs finished.", ""]
    paper = PAPER.get(options.dataset)
    if paper:
        lines += [f"Paper figures (HyP² paper, {paper['backbone']}, mAP@{paper['topk']}) in brackets"
                  + ("" if paper["backbone"] == options.backbone else
                     f"; this grid uses {options.backbone}, so they are a reference, not a target") + ".", ""]
    if options.loss_args:
        lines += ["Per-loss flags: " + "; ".join(f"{variant} `{shlex.join(flags)}`"
                                                 for variant, flags in options.loss_args) + ".", ""]
    lines += data_files_lines(rows) + frozen_trunk_lines(options, variants)
    recipes = describe_recipes(options, variants)
    if recipes:
        lines += ["Rows NAME_authors: the loss as its authors ran it, with the flags of its recipe file in "
                  "configs/authors/ (docs/METHOD.md §6): " + "; ".join(recipes) + ".", ""]
    lines += [header, rule]
    lines += ["| " + " | ".join([first(variant)] + [format_map(by_cell[(variant, bits)], best[bits])
                                             for bits in options.bits]) + " |" for variant in variants]
    lines += class_split_table(options, variants, by_cell)
    lines += ["", "Training seconds per run (mean over seeds; evaluation excluded):", "", header, rule]
    lines += ["| " + " | ".join([first(variant)] + [f"{by_cell[(variant, bits)]['train_seconds_mean']:.1f}"
                                             if by_cell[(variant, bits)]["runs"] else "—"
                                             for bits in options.bits]) + " |" for variant in variants]
    return "\n".join(lines + [""] + generated_lines(command))


CSV_COLUMNS = ["loss", "hash_bit", "runs", "trained", "select", "map_mean", "map_std", "map_per_seed",
               "final_map_mean", "train_seconds_mean", "threads", "data_files", "topk", "paper_map"]
# the columns an --unseen_classes grid adds
CLASS_SPLIT_COLUMNS = [f"{name}_map_{part}" for name in DEFINITIONS for part in ("mean", "std")]


def render_csv(rows):
    buffer = io.StringIO()
    columns = CSV_COLUMNS + (CLASS_SPLIT_COLUMNS if any("seen_map_mean" in row for row in rows) else [])
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {key: ("" if row.get(key) is None else row.get(key)) for key in columns}
        cells["map_per_seed"] = ";".join(f"{value:.6f}" for value in row.get("map_per_seed", []))
        cells["threads"] = torch.get_num_threads()
        writer.writerow(cells)
    return buffer.getvalue()


def write_tables(options, variants, cells, command):
    rows = table_rows(options, variants, collect(cells))
    stem = grid_root(options)  # the tables sit beside the grid's folder, named after it
    write_text(stem.parent / f"{stem.name}.md", render_markdown(options, variants, rows, command))
    write_text(stem.parent / f"{stem.name}.csv", render_csv(rows))
    return rows, stem


def best_per_bits(options, rows):
    parts = []
    for bits in options.bits:
        done = [row for row in rows if row["hash_bit"] == bits and row["runs"]]
        if done:
            top = max(done, key=lambda row: row["map_mean"])
            parts.append(f"{bits} bits {top['loss']} {top['map_mean']:.4f}")
    return ", ".join(parts) or "no finished runs"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    options = get_args_parser().parse_args([arg for arg in argv if arg != "--"])  # "--" was once required
    refuse_grid_owned(options)
    distinct(options.seeds, "--seeds")
    distinct(options.bits, "--bits")
    variants = list(dict.fromkeys(options.losses))
    command = "python benchmarks/compare.py " + " ".join(argv)
    per_loss = dict(options.loss_args)
    unused = set(per_loss) - set(variants)
    if unused:
        raise UserError(f"--loss_args names {', '.join(sorted(unused))}, which --losses does not include")
    hashers = shallow_rows(options)
    labels = row_labels(variants, options.baseline_recipe)
    cells = {(label, bits, seed): cell_args(options, label, bits, seed, per_loss.get(split_label(label)[0], []))
             for seed in options.seeds for bits in options.bits for label in labels}
    cells.update({(hasher, bits, seed): hasher_cell_args(options, hasher, bits, seed)
                  for seed in options.seeds for bits in options.bits for hasher in hashers})
    labels += hashers
    Path(options.output_dir).mkdir(parents=True, exist_ok=True)
    if not all(finished_record(args) for args in cells.values()):  # once, not as the same error in every cell
        check_available(options.dataset, options.data_root, DataOptions(split=options.split), options.seeds[0])

    started = time.perf_counter()
    trained, reused, failures = 0, 0, []
    progress = tqdm(cells.items(), desc="compare", unit="run", dynamic_ncols=True)
    for (variant, bits, seed), args in progress:
        progress.set_postfix_str(f"{variant} {bits} bits seed {seed}")
        if finished_record(args) is not None:
            reused += 1
            continue
        error = run_cell(args, options.verbose)
        if error:
            failures.append(f"{variant} {bits} bits seed {seed}: {error}")
            tqdm.write(f"failed: {failures[-1]}")
        else:
            trained += 1
        write_tables(options, labels, cells, command)
    progress.close()
    rows, stem = write_tables(options, labels, cells, command)

    print(f"{trained + reused}/{len(cells)} runs done ({trained} trained, {reused} reused, {len(failures)} failed) "
          f"in {time.perf_counter() - started:.0f}s; best: {best_per_bits(options, rows)}; "
          f"tables {stem}.md, {stem}.csv")
    return {"trained": trained, "reused": reused, "failed": failures, "rows": rows}


def cli(argv=None):
    summary = run_reporting_errors(lambda: main(argv), "; run the same command again to resume")
    sys.exit(1 if summary["failed"] else 0)


if __name__ == "__main__":
    cli()
