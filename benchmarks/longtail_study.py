"""The long-tail and hierarchy studies of docs/STUDIES.md (definitions: docs/METHOD.md §8, §9): each cell a
full training run of retrieval.py, summarised in OUTPUT_DIR/longtail_study.md (rewritten atomically after every
cell).

    python benchmarks/longtail_study.py                              # both studies, 3 seeds (docs/STUDIES.md's tables)
    python benchmarks/longtail_study.py --studies ecl --seeds 0 --epochs 6
    python benchmarks/longtail_study.py --studies hpl --seeds 0 1 2
    python benchmarks/longtail_study.py --table_only                # the table of the finished cells only

ecl: long-tailed digits (--imbalance 10 and 50), single-head HyP² against --experts 2 with ECL's components
added one at a time (mutual distillation with uniform weights, then its per-class re-weighting, then
feature distillation, then the contrastive proxy term); overall mAP and the tail bucket's mAP.
hpl: balanced digits, HyP² without a hierarchy, with clustered proxies (from iteration 0, and after a
warm-up) and with the given parity hierarchy (data/hierarchies/digits.csv).

Seeds run outermost, so an interrupted study has whole seeds. A cell whose run finished with the same
settings is reused (benchmarks/compare.py's finished_record); one that was interrupted continues from its
training state, and one that finished under other settings (e.g. other --epochs) is trained again
(compare.train_or_resume), so a rerun completes the study. Ctrl-C stops the study, naming the cell.
Seeded results change with the number of CPU threads: the table records it, and its rerun command sets it.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retrieval  # noqa: E402
from benchmarks import compare  # noqa: E402
from utils.atomic import write_text  # noqa: E402
from utils.documents import MAX_METRICS_BYTES, read_json_file  # noqa: E402
from utils.errors import run_reporting_errors  # noqa: E402
from utils.argtypes import positive_int, seed_value  # noqa: E402
from session.files import RunFiles  # noqa: E402

TWO_HEADS = ["--experts", "2"]
DISTILL = [*TWO_HEADS, "--ecl_distill", "1"]
# Each ECL variant adds one component to the one before it.
ECL_VARIANTS = {
    "HyP² (1 head)": [],
    "2 heads": TWO_HEADS,
    "+ distillation (uniform)": [*DISTILL, "--ecl_reweight", "0"],
    "+ per-class re-weighting": DISTILL,
    "+ feature distillation": [*DISTILL, "--ecl_feature", "1"],
    "+ contrastive proxies": [*DISTILL, "--ecl_feature", "1", "--ecl_contrastive", "0.5"],
}
HPL_VARIANTS = {
    "HyP² (no hierarchy)": [],
    "clustered, K = 2, from iteration 0": ["--hierarchy", "2"],
    "clustered, K = 2, after 2 warm-up epochs": ["--hierarchy", "2", "--hierarchy_warmup", "2"],
    "given: parity": ["--hierarchy_file", "digits"],
}
STUDIES = {"ecl": (ECL_VARIANTS, (10.0, 50.0)), "hpl": (HPL_VARIANTS, (1.0,))}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    parser.add_argument("--seeds", nargs="+", type=seed_value, default=[0, 1, 2])
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--hash_bit", type=positive_int, default=48)
    parser.add_argument("--output_dir", default="./result")
    parser.add_argument("--verbose", action="store_true", help="show each run's output")
    parser.add_argument("--table_only", action="store_true",
                        help="train nothing: write the table from the cells that finished (e.g. in parallel processes)")
    return parser


def cell_args(options, study, variant, imbalance, seed):
    flags = STUDIES[study][0][variant]
    slug = "".join(ch if ch.isalnum() else "_" for ch in variant).strip("_")
    output_dir = Path(options.output_dir) / "longtail_study" / f"{study}_{slug}_rho{imbalance:g}_seed{seed}"
    argv = ["--dataset", "digits", "--backbone", "small", "--hash_bit", str(options.hash_bit),
            "--epochs", str(options.epochs), "--eval_every", str(options.epochs), "--imbalance", f"{imbalance:g}",
            "--seed", str(seed), "--output_dir", str(output_dir), "--no_progress", "--overwrite", *flags]
    return retrieval.get_args_parser().parse_args(argv)


def cell_result(args):
    """(overall mAP, tail-bucket mAP) of a finished cell, else None."""
    if compare.finished_record(args) is None:
        return None
    metrics = read_json_file(RunFiles.for_args(args).metrics, "metrics file", MAX_METRICS_BYTES)
    return metrics["map"], metrics["long_tail"]["buckets"]["tail"]["map"]


def format_stat(values):
    if not values:
        return "—"
    mean, std = compare.summarise(values)
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def render(options, cells, command):
    lines = ["# Long-tail and hierarchy studies (digits, small backbone)", "",
             f"{options.hash_bit} bits, {options.epochs} epochs, mAP@all after the last epoch; mean ± sample "
             "standard deviation over the finished seeds (runs column). Tail = mean AP of the 3 rarest training "
             "classes (docs/METHOD.md §9.2).", ""]
    for study in options.studies:
        variants, imbalances = STUDIES[study]
        lines += [f"## {study}", "", "| variant | " + " | ".join(
            f"ρ = {rho:g}: mAP | tail mAP | runs" for rho in imbalances) + " |",
            "|---|" + "---|---|---|" * len(imbalances)]
        for variant in variants:
            cellsets = []
            for rho in imbalances:
                results = [r for r in (cells[(study, variant, rho, seed)] for seed in options.seeds) if r]
                cellsets += [format_stat([r[0] for r in results]), format_stat([r[1] for r in results]),
                             str(len(results))]
            lines.append(f"| {variant} | " + " | ".join(cellsets) + " |")
        lines.append("")
    return "\n".join(lines + compare.generated_lines(command))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    options = get_args_parser().parse_args(argv)
    compare.distinct(options.seeds, "--seeds")
    command = "python benchmarks/longtail_study.py " + " ".join(argv)
    grid = [(study, variant, rho, seed) for seed in options.seeds for study in options.studies
            for rho in STUDIES[study][1] for variant in STUDIES[study][0]]
    results = {key: cell_result(cell_args(options, *key)) for key in grid}
    table = Path(options.output_dir) / "longtail_study.md"
    Path(options.output_dir).mkdir(parents=True, exist_ok=True)
    started, failures = time.perf_counter(), []
    for done, key in enumerate([] if options.table_only else grid, start=1):
        if results[key] is None:
            results[key] = cell_result(cell_args(options, *key))  # another process may have run it meanwhile
        if results[key] is None:
            cell_started = time.perf_counter()
            error = compare.train_or_resume(cell_args(options, *key), options.verbose)
            results[key] = None if error else cell_result(cell_args(options, *key))
            if results[key] is None and not error:
                error = "it finished, but its run log does not record this cell's settings or cannot be tabulated"
            outcome = f"failed: {error}" if error else f"mAP {results[key][0]:.4f}, tail {results[key][1]:.4f}"
            failures += [f"{key}: {error}"] if error else []
            print(f"[{done}/{len(grid)}] {key[0]} {key[1]} rho {key[2]:g} seed {key[3]}: {outcome} "
                  f"({time.perf_counter() - cell_started:.0f}s)", flush=True)
        write_text(table, render(options, results, command))
    write_text(table, render(options, results, command))
    print(f"{sum(r is not None for r in results.values())}/{len(grid)} cells done in "
          f"{time.perf_counter() - started:.0f}s; table {table}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if run_reporting_errors(main) else 0)
