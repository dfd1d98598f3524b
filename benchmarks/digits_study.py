"""A fair convergence comparison of the losses on `digits` (docs/STUDIES.md, "Convergence on digits"), or on
another dataset with --dataset (e.g. fashion_mosaic, real images); the outputs are named after the dataset.

    python -m benchmarks.digits_study --output_dir /tmp/study         # docs/STUDIES.md's study
    python -m benchmarks.digits_study --losses hyp2 dpsh --bits 16 --seeds 0 --epochs 2 --subset 300   # smoke

1. Search: for every loss, each recipe of its small search space (SEARCH_SPACE, recipe files in configs/digits_study/: the project's SGD at two
   learning rates, and the optimiser its source paper or DeepHash-pytorch uses) trains once (seed 0,
   --search_bits) with `--select val`: the score is the mAP of a validation split held out from the
   training set. The test queries play no part in the choice.
2. Final: every loss at its best recipe, every --bits, every --seeds, with `--select last` and an
   evaluation on the test queries after every epoch: (a) the final mAP, (b) the first epoch (and the
   training seconds) at which a run reaches 95 % of its own final mAP, (c) the mAP-per-epoch curves, mean
   ± sample std over the seeds, drawn as OUTPUT_DIR/{dataset}_study.convergence_{bits}.png, and (d) the epoch
   at which each loss's mean curve reaches one level shared by all losses: 95 % of the best final mean mAP
   at that code length (a loss that settles early at a low mAP reaches its own 95 % early, but not this).

Runs are retrieval.py runs (benchmarks/compare.py's train_or_resume and finished_record): a finished run
is reused and an interrupted one continues from its training state, so an interrupted study resumes. Other
arguments are retrieval.py flags for every run (e.g. --device, --batch_size). Tables OUTPUT_DIR/{dataset}_study.md
and .csv and the figures are written at the end.
"""
import argparse
import csv
import io
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retrieval  # noqa: E402
from benchmarks import compare  # noqa: E402
from data import DATASETS  # noqa: E402
from hashing.evaluation import plots
from loss import LOSSES  # noqa: E402
from utils.atomic import write_text  # noqa: E402
from utils.config import config_arguments, read_config  # noqa: E402
from utils.errors import run_reporting_errors  # noqa: E402
from utils.argtypes import positive_int, seed_value  # noqa: E402

# The search candidates are recipe files in configs/digits_study/ (each says why it is there): the project's
# SGD at two learning rates for every loss, and as a third candidate the optimiser of the loss's own code
# (RMSprop for the pair losses and CSQ, as DeepHash-pytorch; Adam for the others).
RECIPE_FOLDER = Path(__file__).resolve().parents[1] / "configs" / "digits_study"
SGD_RECIPES = ("sgd_0.05", "sgd_0.01")
OWN_OPTIMISER = {loss: "rmsprop_1e-3" if loss in ("dhn", "dpsh", "hashnet", "dch", "csq") else "adam_1e-3"
                 for loss in LOSSES}
SEARCH_SPACE = {loss: (*SGD_RECIPES, OWN_OPTIMISER[loss]) for loss in LOSSES}


def recipe_flags(name):
    """retrieval.py flags of the search candidate `name` (configs/digits_study/{name}.yaml)."""
    path = RECIPE_FOLDER / f"{name}.yaml"
    return config_arguments(retrieval.get_args_parser(), read_config(path), path)


CONVERGED = 0.95  # "converged": the first epoch at 95 % of the run's final mAP
FLAGS_SET_PER_RUN = ("--dataset", "--backbone", "--hash_bit", "--loss", "--seed", "--output_dir", "--select",
                     "--optimizer", "--lr", "--epochs", "--subset", "--eval_every")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other arguments are retrieval.py flags for every run.")
    parser.add_argument("--dataset", default="digits", choices=list(DATASETS),
                        help="the dataset of every run (the search candidates stay configs/digits_study/'s)")
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES), help="losses")
    parser.add_argument("--bits", nargs="+", type=positive_int, default=[12, 24, 48], help="hash bits")
    parser.add_argument("--seeds", nargs="+", type=seed_value, default=[0, 1, 2], help="seeds of the final runs")
    parser.add_argument("--search_bits", type=positive_int, default=24, help="hash bits of the search")
    parser.add_argument("--recipe", action="append", type=parse_recipe, default=[], metavar="LOSS=RECIPE",
                        help="take this recipe of configs/digits_study/ for LOSS instead of searching (repeatable; "
                             "e.g. the recipes the digits search chose, where a search on a larger set costs too much)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="epochs of every run")
    parser.add_argument("--subset", type=positive_int, default=1000,
                        help="first N images of each split (train = database N, queries min(N, 500))")
    parser.add_argument("--val_size", type=positive_int, default=200,
                        help="training items held out for the search's validation")
    parser.add_argument("--output_dir", default="./result", help="folder of the tables, figures and runs")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: tabulate the runs that have finished (e.g. while the study runs)")
    parser.add_argument("--verbose", action="store_true", help="show each run's output")
    return parser


def parse_recipe(text):
    """argparse type of --recipe: 'dhn=sgd_0.01' -> ('dhn', 'sgd_0.01'), both checked."""
    loss, _, recipe = text.partition("=")
    if loss not in LOSSES or recipe not in {name for names in SEARCH_SPACE.values() for name in names}:
        raise argparse.ArgumentTypeError(f"expected LOSS=RECIPE with a loss of {', '.join(LOSSES)} and a recipe of "
                                         f"{RECIPE_FOLDER} (without .yaml), got {text!r}")
    return loss, recipe


def parse(argv):
    """The study's options; the retrieval.py flags for every run are options.overrides."""
    options, options.overrides = compare.parse_with_run_flags(
        get_args_parser(), argv, FLAGS_SET_PER_RUN, "the study", "--losses, --bits, --seeds, --epochs, --subset")
    compare.distinct(options.seeds, "--seeds")
    compare.distinct(options.bits, "--bits")
    compare.distinct(options.losses, "--losses")
    return options


def run_args(options, phase, loss, bits, seed, recipe):
    """retrieval.py's parsed flags of one run: phase "search" (select val) or "final" (select last)."""
    name, flags = recipe, recipe_flags(recipe)
    selection = ["--select", "val", "--val_size", str(options.val_size), "--eval_every", str(options.epochs)] \
        if phase == "search" else ["--select", "last", "--eval_every", "1"]
    folder = Path(options.output_dir) / f"{options.dataset}_study" / phase / f"{loss}_{name}_{bits}bit_seed{seed}"
    argv = ["--dataset", options.dataset, "--backbone", "small", "--hash_bit", str(bits), "--loss", loss,
            "--seed", str(seed),
            "--epochs", str(options.epochs), "--subset", str(options.subset), *selection, *flags,
            *options.overrides, "--output_dir", str(folder)]
    return retrieval.get_args_parser().parse_args(argv)


def run_once(args, options, progress):
    """The run's finished record, training it first unless it finished before (or --collect); None if it
    failed or has not run. progress = (phase, recipe, k, of): a trained run prints one line when it ends,
    so that a study whose stderr is no terminal (no progress bars) still shows how far it is."""
    record = compare.finished_record(args)
    if record is None and not options.collect:
        phase, recipe, done, total = progress
        started = time.perf_counter()
        error = compare.train_or_resume(args, options.verbose)
        record = None if error else compare.finished_record(args)
        if error or record is None:
            score = f"failed: {error or 'no finished log'}"
        elif phase == "search":
            score = f"val mAP {record['selection']['val_map']:.4f}"
        else:
            score = f"mAP {record['epochs'][-1]['map']:.4f}"
        print(f"[{done}/{total}] {phase} {args.loss} {recipe} {args.hash_bit} bits seed {args.seed}: {score} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)
    return record


def search(options):
    """{loss: {recipe: validation mAP}} of the search runs that finished; {loss: {recipe: None}} for a --recipe."""
    given = dict(options.recipe)
    scores = {loss: {given[loss]: None} for loss in options.losses if loss in given}
    runs = [(loss, recipe) for loss in options.losses if loss not in given for recipe in SEARCH_SPACE[loss]]
    for number, (loss, recipe) in enumerate(runs, start=1):
        record = run_once(run_args(options, "search", loss, options.search_bits, 0, recipe), options,
                          ("search", recipe, number, len(runs)))
        if record is not None:
            scores.setdefault(loss, {})[recipe] = record["selection"]["val_map"]
    return scores


def best_recipe(scores, loss):
    """The recipe with the best validation mAP (the first listed on a tie); the project's default without scores."""
    candidates = scores.get(loss) or {"sgd_0.05": 0.0}
    return max(candidates, key=candidates.get)  # a single candidate (a --recipe, scored None) is never compared


def search_progress(scores, loss):
    """"k/n": how many of the loss's search runs finished."""
    return f"{len(scores.get(loss, {}))}/{len(SEARCH_SPACE.get(loss, ()))}"


def chosen_recipe(scores, loss):
    """The --recipe given for the loss; else best_recipe once every search run of the loss has finished; else None
    (nothing has been chosen)."""
    candidates = scores.get(loss, {})
    given = [recipe for recipe, score in candidates.items() if score is None]
    if given:
        return given[0]
    return best_recipe(scores, loss) if len(candidates) >= len(SEARCH_SPACE.get(loss, ())) else None


def describe_choice(scores, loss):
    """The chosen recipe's name, or how far the loss's search is."""
    return chosen_recipe(scores, loss) or f"not chosen yet ({search_progress(scores, loss)} search runs finished)"


def final_recipe(options, scores, loss):
    """The recipe of the loss's final runs: the chosen one; when a search run failed, the best of those that
    finished; under --collect before the search is complete, None (no final run can be looked up)."""
    return chosen_recipe(scores, loss) or (None if options.collect else best_recipe(scores, loss))


def recipe_label(options, scores, loss):
    """The loss's recipe as the final table names it."""
    recipe = final_recipe(options, scores, loss)
    if recipe is None:
        return f"not chosen yet: {search_progress(scores, loss)} search runs"
    return f"`{recipe}`" + ("" if chosen_recipe(scores, loss) else f", of {search_progress(scores, loss)} search runs")


def converged_at(epochs):
    """(epoch, training seconds) at which a run's mAP first reaches CONVERGED x its final mAP."""
    final = epochs[-1]["map"]
    first = next(entry for entry in epochs if entry["map"] >= CONVERGED * final)
    return first["epoch"], first["train_seconds"]


def mean_curve(records):
    """[(epoch, mAP averaged over the runs)] of runs evaluated at the same epochs."""
    return [(entries[0]["epoch"], statistics.mean(entry["map"] for entry in entries))
            for entries in zip(*(record["epochs"] for record in records))]


def epoch_reaching(curve, level):
    """The first epoch at which a mean curve reaches `level`; None if it never does."""
    return next((epoch for epoch, value in curve if value >= level), None)


def final_runs(options, scores):
    """{(loss, bits): [finished records]}, seed by seed over the whole grid (a partial study covers every cell)."""
    results = {(loss, bits): [] for loss in options.losses for bits in options.bits}
    runs = [(seed, bits, loss) for seed in options.seeds for bits in options.bits for loss in options.losses]
    for number, (seed, bits, loss) in enumerate(runs, start=1):
        recipe = final_recipe(options, scores, loss)
        if recipe is None:
            continue
        record = run_once(run_args(options, "final", loss, bits, seed, recipe), options,
                          ("final", recipe, number, len(runs)))
        if record is not None:
            results[(loss, bits)].append(record)
    return results


def summary_rows(options, scores, results):
    """One row per (loss, bits). Besides each run's own 95 % point, `epoch_to_shared_level` is when the loss's
    mean curve first reaches CONVERGED x the best final mean mAP at that code length (the same level for every
    loss, so a loss that converges early to a low mAP does not look fast); None if it never does."""
    rows = []
    for loss in options.losses:
        for bits in options.bits:
            records = results[(loss, bits)]
            row = {"loss": loss, "hash_bit": bits, "recipe": final_recipe(options, scores, loss) or "",
                   "runs": len(records)}
            if records:
                finals = [record["epochs"][-1]["map"] for record in records]
                reached = [converged_at(record["epochs"]) for record in records]
                row["map_mean"], row["map_std"] = compare.summarise(finals)
                row["epochs_to_95"] = statistics.mean(epoch for epoch, _ in reached)
                row["seconds_to_95"] = statistics.mean(seconds for _, seconds in reached)
                row["train_seconds"] = statistics.mean(record["train_seconds"] for record in records)
            rows.append(row)
    for bits in options.bits:
        column = [row for row in rows if row["hash_bit"] == bits and row["runs"]]
        if column:
            level = CONVERGED * max(row["map_mean"] for row in column)
            for row in column:
                row["shared_level"] = level
                row["epoch_to_shared_level"] = epoch_reaching(mean_curve(results[(row["loss"], bits)]), level)
    return rows


def format_cell(row, best, seeds):
    if not row["runs"]:
        return "—"
    text = f"{row['map_mean']:.3f}" + (f" ± {row['map_std']:.3f}" if row["map_std"] is not None else "")
    text = f"**{text}**" if row["map_mean"] == best else text
    partial = f" ({row['runs']} of {seeds} seeds)" if row["runs"] < seeds else ""
    return f"{text} · {row['epochs_to_95']:.1f} ep · {row['seconds_to_95']:.1f} s{partial}"


def search_heading(options):
    if set(options.losses) <= set(dict(options.recipe)):
        return "Recipes (given with --recipe, no search):"
    return (f"Search (seed 0, {options.search_bits} bits, validation mAP of {options.val_size} held-out training items "
            "after the last epoch; the chosen recipe in bold):")


def render_markdown(options, scores, rows, invocation):
    lines = [f"# Convergence on {options.dataset}: {options.epochs} epochs, first {options.subset} images of each "
             "split", "",
             search_heading(options), "",
             "| loss | " + " | ".join(f"`{name}`" for name in ["sgd_0.05", "sgd_0.01", "published"]) + " |",
             "|---|---|---|---|"]
    for loss in options.losses:
        cells = []
        for recipe, score in scores.get(loss, {}).items():
            if score is None:
                cells.append(f"given: `{recipe}` (--recipe, not searched)")
                continue
            text = f"{score:.3f}" + ("" if recipe in SGD_RECIPES else f" (`{recipe}`)")
            cells.append(f"**{text}**" if recipe == chosen_recipe(scores, loss) else text)
        lines.append(f"| {loss} | " + " | ".join(cells + ["—"] * (3 - len(cells))) + " |")
    by_cell = {(row["loss"], row["hash_bit"]): row for row in rows}
    best = {bits: max((row["map_mean"] for row in rows if row["hash_bit"] == bits and row["runs"]), default=None)
            for bits in options.bits}
    lines += ["", f"Final mAP (all, after epoch {options.epochs}, mean ± sample std over seeds "
              f"{' '.join(map(str, options.seeds))}) · epochs · training seconds to reach 95 % of the run's final "
              "mAP (means over the seeds); best mean per column in bold:", "",
              "| loss (recipe) | " + " | ".join(f"{bits} bits" for bits in options.bits) + " |",
              "|---|" + "---|" * len(options.bits)]
    for loss in options.losses:
        lines.append(f"| {loss} ({recipe_label(options, scores, loss)}) | " + " | ".join(
            format_cell(by_cell[(loss, bits)], best[bits], len(options.seeds)) for bits in options.bits) + " |")
    levels = {bits: next((row["shared_level"] for row in rows if row["hash_bit"] == bits and "shared_level" in row),
                         None) for bits in options.bits}
    lines += ["", "Epoch at which the mean curve over the seeds first reaches 95 % of the best final mean mAP of its "
              "column (the same level for every loss; — = not within the epochs):", "",
              "| loss | " + " | ".join(f"{bits} bits (≥ {levels[bits]:.3f})" if levels[bits] else f"{bits} bits"
                                      for bits in options.bits) + " |",
              "|---|" + "---|" * len(options.bits)]
    for loss in options.losses:
        cells = [by_cell[(loss, bits)].get("epoch_to_shared_level") for bits in options.bits]
        lines.append(f"| {loss} | " + " | ".join("—" if epoch is None else str(epoch) for epoch in cells) + " |")
    return "\n".join(lines + ["", compare.threads_note(), "", f"Generated by `{compare.rerun_command(invocation)}`.",
                               ""])


CSV_COLUMNS = ["loss", "hash_bit", "recipe", "runs", "map_mean", "map_std", "epochs_to_95", "seconds_to_95",
               "train_seconds", "shared_level", "epoch_to_shared_level", "threads"]


def render_csv(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**{key: ("" if row.get(key) is None else row.get(key)) for key in CSV_COLUMNS},
                      "threads": torch.get_num_threads()} for row in rows)
    return buffer.getvalue()


def draw_curves(options, results):
    """One figure per bit length: every loss's test mAP per epoch, mean ± std over its seeds."""
    paths = []
    for bits in options.bits:
        curves = [(loss, [entry["epoch"] for entry in records[0]["epochs"]],
                   [[entry["map"] for entry in record["epochs"]] for record in records])
                  for loss in options.losses for records in [results[(loss, bits)]] if records]
        if curves:
            path = Path(options.output_dir) / f"{options.dataset}_study.convergence_{bits}.png"
            title = f"{options.dataset} · small · {bits} bits · test queries"
            paths.append(plots.plot_mean_curves(curves, path, title, ylabel="mAP"))
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    options = parse(argv)
    invocation = shlex.join(["python", "-m", "benchmarks.digits_study", *argv])
    started = time.perf_counter()
    Path(options.output_dir).mkdir(parents=True, exist_ok=True)
    scores = search(options)
    print("search: " + ", ".join(f"{loss} {describe_choice(scores, loss)}" for loss in options.losses),
          file=sys.stderr)
    results = final_runs(options, scores)
    rows = summary_rows(options, scores, results)
    stem = Path(options.output_dir) / f"{options.dataset}_study"
    write_text(stem.with_suffix(".md"), render_markdown(options, scores, rows, invocation))
    write_text(stem.with_suffix(".csv"), render_csv(rows))
    figures = draw_curves(options, results)
    print(f"{options.dataset} study: {sum(row['runs'] for row in rows)} final runs in "
          f"{time.perf_counter() - started:.0f}s; "
          f"tables {stem}.md, {stem}.csv; figures {', '.join(map(str, figures))}")
    return {"scores": scores, "rows": rows, "figures": figures}


def cli(argv=None):
    run_reporting_errors(lambda: main(argv), "; run the same command again to resume")


if __name__ == "__main__":
    cli()
