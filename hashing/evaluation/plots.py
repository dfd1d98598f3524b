"""The paper's figures as PNG files: precision@top-N curve, precision-recall curve over Hamming radii,
mAP against training seconds (convergence), and a t-SNE of database codes coloured by their first label.

Every curve function takes a list of (legend label, data) pairs, so one run and an overlay of several
runs (one line per loss, as in the paper's figures) are drawn by the same code. Figures are built on
matplotlib's object API with the Agg canvas, so importing this module changes no global backend.
"""
import io
from pathlib import Path

import matplotlib

import numpy as np
from matplotlib.figure import Figure

from utils.atomic import atomic_write

FIGURE_SIZE = (6.4, 4.8)
DPI = 120
MARKERS = "osD^v<>px*h"
TSNE_SAMPLE = 1000  # database codes in the t-SNE figure; Barnes-Hut t-SNE takes ~10 s for 1,000 on 2 cores


def describe_run(run):
    """'voc2007 · googlenet · 48 bits · hyp2' from a metrics file's "run" section (missing parts left out)."""
    parts = [run.get("dataset"), run.get("backbone"),
             f"{run['hash_bit']} bits" if run.get("hash_bit") is not None else None, run.get("loss")]
    return " · ".join(str(part) for part in parts if part)


def _save(figure, path):
    """Write the figure atomically, in the format of the path's extension (png, pdf or svg)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=DPI, bbox_inches="tight")
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()), binary=True)


def _axes(title, xlabel, ylabel):
    figure = Figure(figsize=FIGURE_SIZE)
    axes = figure.subplots()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _as_floats(values):
    """JSON lists may hold None for undefined points; matplotlib leaves NaN out of a line."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _finish(figure, axes, path, legend=True):
    if legend and axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best", fontsize="small")
    _save(figure, path)
    return path


def plot_top_n_precision(runs, path, title):
    """runs: [(label, metrics)] with metrics as written to {run}.metrics.json."""
    figure, axes = _axes(f"precision@top-N — {title}", "N (number of top-ranked items)", "precision")
    for (label, metrics), marker in zip(runs, MARKERS * len(runs)):
        curve = metrics["precision_at_top_n"]
        axes.plot(curve["n"], _as_floats(curve["precision"]), marker=marker, markersize=4, label=label)
    # Autoscaled, unlike the PR curve: runs of different losses differ by a few points near the top.
    return _finish(figure, axes, path)


def plot_precision_recall(runs, path, title):
    """runs: [(label, metrics)]; one point per Hamming radius 0..n, radius 2 ringed."""
    figure, axes = _axes(f"precision–recall over Hamming radii — {title}", "recall", "precision")
    for (label, metrics), marker in zip(runs, MARKERS * len(runs)):
        curve = metrics["precision_recall"]
        recall, precision = _as_floats(curve["recall"]), _as_floats(curve["precision"])
        line, = axes.plot(recall, precision, marker=marker, markersize=3, label=label)
        radius = metrics["precision_within_radius"]["radius"]
        axes.plot(recall[radius], precision[radius], "o", markersize=9, fillstyle="none", color=line.get_color())
    radii = {metrics["precision_within_radius"]["radius"] for _, metrics in runs}
    axes.plot([], [], "o", markersize=9, fillstyle="none", color="gray",
              label=f"Hamming radius {radii.pop()}" if len(radii) == 1 else "table radius")
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(0, 1.02)
    return _finish(figure, axes, path)


def plot_convergence(runs, path, title):
    """runs: [(label, run log)] with run logs as written to {run}.jsonl: mAP of the evaluated epochs against
    the epoch (left) and against the cumulative training seconds, evaluation time excluded (right)."""
    figure = Figure(figsize=(FIGURE_SIZE[0] * 2, FIGURE_SIZE[1]))
    by_epoch, by_time = figure.subplots(1, 2, sharey=True)
    figure.suptitle(f"convergence — {title}")
    topks = {log.get("topk") for _, log in runs}
    for axes, xlabel in ((by_epoch, "epoch"), (by_time, "training time (s)")):
        axes.set_xlabel(xlabel)
        axes.grid(True, alpha=0.3)
    by_epoch.set_ylabel(f"mAP@{next(iter(topks))}" if len(topks) == 1 and None not in topks else "mAP")
    for (label, log), marker in zip(runs, MARKERS * len(runs)):
        evaluated = [epoch for epoch in log["epochs"] if epoch.get("map") is not None]
        label = label if len(topks) == 1 else f"{label} (mAP@{log.get('topk')})"
        maps = [e["map"] for e in evaluated]
        by_epoch.plot([e["epoch"] for e in evaluated], maps, marker=marker, markersize=4, label=label)
        by_time.plot([e["train_seconds"] for e in evaluated], maps, marker=marker, markersize=4, label=label)
    return _finish(figure, by_epoch, path)


# scikit-learn's t-SNE needs a perplexity below the number of points, and the smallest it accepts here is 2.
TSNE_MIN_ITEMS = 3


def plot_mean_curves(curves, path, title, ylabel="mAP"):
    """curves: [(label, epochs, per-run values as rows)]: the mean over runs against the epoch, with a band of
    ± one sample standard deviation when there are several runs (the seeds of one setting)."""
    figure, axes = _axes(title, "epoch", ylabel)
    for (label, epochs, runs), marker in zip(curves, MARKERS * len(curves)):
        values = np.asarray(runs, dtype=np.float64)
        mean = values.mean(axis=0)
        line, = axes.plot(epochs, mean, marker=marker, markersize=3, label=f"{label} ({len(values)} runs)")
        if len(values) > 1:
            spread = values.std(axis=0, ddof=1)
            axes.fill_between(epochs, mean - spread, mean + spread, color=line.get_color(), alpha=0.15)
    return _finish(figure, axes, path)


def tsne_embedding(codes, seed=0):
    """2-D t-SNE of +-1 codes (euclidean distance on +-1 codes is 2 * sqrt(Hamming distance))."""
    from sklearn.manifold import TSNE
    perplexity = min(30.0, max(2.0, (len(codes) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(codes, dtype=np.float32))


def _class_name(cls, class_names):
    if cls < 0:
        return "no label"
    return class_names[cls] if cls < len(class_names) else f"class {cls}"


def plot_tsne(codes, labels, path, title, sample=TSNE_SAMPLE, seed=0, class_names=()):
    """t-SNE of a seeded random sample of database codes, coloured by each item's first label (named by
    `class_names` where the dataset has them, else by class index)."""
    labels = np.asarray(labels) > 0
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(codes), size=min(sample, len(codes)), replace=False))
    points = tsne_embedding(np.asarray(codes)[chosen], seed)
    first_label = np.where(labels[chosen].any(axis=1), labels[chosen].argmax(axis=1), -1)

    distinct = len(np.unique(np.asarray(codes)[chosen], axis=0))
    figure, axes = _axes(f"t-SNE of {len(chosen)} database codes ({distinct} distinct) — {title}",
                         "t-SNE 1", "t-SNE 2")
    num_classes = labels.shape[1]
    if num_classes <= 20:
        palette = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
        for cls in np.unique(first_label):
            members = first_label == cls
            axes.scatter(points[members, 0], points[members, 1], s=6,
                         color=palette(cls) if cls >= 0 else "gray", label=_class_name(cls, class_names))
        axes.legend(title="first label", fontsize="x-small", markerscale=2, loc="center left",
                    bbox_to_anchor=(1.01, 0.5))
    else:
        scatter = axes.scatter(points[:, 0], points[:, 1], s=6, c=first_label, cmap="turbo")
        figure.colorbar(scatter, ax=axes, label="first label (class index)")
    axes.set_xticks([])
    axes.set_yticks([])
    return _finish(figure, axes, path, legend=False)
