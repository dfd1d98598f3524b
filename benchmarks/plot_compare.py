"""Overlay the curves of several runs, one line per run (e.g. one per loss from benchmarks/compare.py),
like the paper's figures: precision@top-N, precision-recall over Hamming radii, mAP vs training seconds.

    python benchmarks/plot_compare.py result/voc2007_googlenet_48 other/voc2007_googlenet_48 \\
        --labels HyP2 DHN --out result/compare_voc2007_48

Each RUN is a run prefix or any of its files ({run}.metrics.json, {run}.jsonl, {run}.ckpt, ...). The
metrics file (written by --test or at the end of training) gives the top-N and PR curves, the training
log {run}.jsonl the convergence curve; a run without one of them is left out of that figure. Writes
OUT.topn.png, OUT.pr.png and OUT.convergence.png.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hashing.evaluation import plots
from utils.documents import MAX_METRICS_BYTES, read_json_file  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.runlog import read_run_log  # noqa: E402

RUN_FILE_SUFFIXES = (".metrics.json", ".codes.npz", ".jsonl", ".json", ".ckpt", ".txt", ".last.pt")


def run_prefix(path):
    name = Path(path).name
    for suffix in RUN_FILE_SUFFIXES:
        if name.endswith(suffix):
            return Path(path).with_name(name[:-len(suffix)])
    return Path(path)


def read_json(path):
    try:
        return read_json_file(path, "run file", MAX_METRICS_BYTES)
    except UserError:
        return None


def read_training_log(prefix):
    """The run's event log folded into one record; older runs wrote that record as {run}.json."""
    try:
        return read_run_log(Path(f"{prefix}.jsonl"))
    except (OSError, UserError):
        return read_json(Path(f"{prefix}.json"))


def load_run(path):
    """(prefix, metrics or None, training log or None)."""
    prefix = run_prefix(path)
    return prefix, read_json(Path(f"{prefix}.metrics.json")), read_training_log(prefix)


def run_description(metrics, log):
    """The "run" record of a metrics file, or the same fields from a training log's args."""
    if metrics:
        return metrics["run"]
    args = log.get("args", {})
    return {"dataset": args.get("dataset"), "backbone": args.get("backbone"), "hash_bit": args.get("hash_bit"),
            "loss": args.get("loss", "hyp2")}


def default_labels(runs):
    """Each run's loss name, or its file name when the losses do not tell the runs apart."""
    losses = [run_description(metrics, log).get("loss") for _, metrics, log in runs]
    if None not in losses and len(set(losses)) == len(losses):
        return losses
    return [prefix.name for prefix, _, _ in runs]


def common_title(runs):
    """The dataset / backbone / bits the runs share (what differs is in the legend)."""
    described = [run_description(metrics, log) for _, metrics, log in runs]
    shared = {field: described[0].get(field) for field in ("dataset", "backbone", "hash_bit")
              if len({d.get(field) for d in described}) == 1}
    return plots.describe_run(shared) or "runs compared"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run prefixes or files of the runs")
    parser.add_argument("--labels", nargs="+", default=None, help="legend label per run (default: the loss)")
    parser.add_argument("--out", default="result/compare", help="output prefix of the PNG files")
    parser.add_argument("--title", default=None, help="figure title (default: what the runs share)")
    args = parser.parse_args(argv)

    runs = [load_run(path) for path in args.runs]
    missing = [str(prefix) for prefix, metrics, log in runs if metrics is None and log is None]
    if missing:
        parser.exit(1, f"error: no {{run}}.metrics.json or {{run}}.jsonl for: {', '.join(missing)}\n")
    if args.labels is not None and len(args.labels) != len(runs):
        parser.exit(1, f"error: {len(args.labels)} --labels for {len(runs)} runs\n")
    labels = args.labels or default_labels(runs)
    title = args.title or common_title(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    with_metrics = [(label, metrics) for label, (_, metrics, _) in zip(labels, runs) if metrics]
    with_log = [(label, log) for label, (_, _, log) in zip(labels, runs) if log and log.get("epochs")]
    written = []
    if with_metrics:
        written.append(plots.plot_top_n_precision(with_metrics, Path(f"{out}.topn.png"), title))
        written.append(plots.plot_precision_recall(with_metrics, Path(f"{out}.pr.png"), title))
    if with_log:
        written.append(plots.plot_convergence(with_log, Path(f"{out}.convergence.png"), title))
    print(f"{len(runs)} runs ({len(with_metrics)} with metrics, {len(with_log)} with a training log): "
          + ", ".join(str(path) for path in written))
    return written


if __name__ == "__main__":
    main()
