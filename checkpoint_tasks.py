"""What a saved checkpoint is used for besides training: --test (every metric, the codes cache, the
figures), --query (search the database with image files) and --export_index (a FAISS index of the
database codes); and the report on the best checkpoint at the end of training.

The codes of a checkpoint come from OUTPUT_DIR/{run}.codes.npz when they were computed from the same
checkpoint bytes and data flags (hashing/cache.py); otherwise the network encodes both splits. Under
torchrun every rank encodes its shard; rank 0 computes, prints and writes.
"""
import sys
from pathlib import Path

import numpy as np
import torch

from data.base import split_labels
from data.query_images import item_names, query_batch
from engine import encode_splits
from hashing import cache, plots
from hashing.codes import pack_signs
from hashing.metrics import BUCKETS, metrics_of_codes
from hashing.search import search, write_index
from loss import loss_label
from utils.atomic import write_json
from utils.checkpoint import load_network_weights
from utils.dist import barrier, broadcast_object
from utils.errors import UserError
from utils.runlog import read_run_log, warn

CHECKPOINT_HINT = ("Pass the --backbone and --hash_bit it was trained with "
                   "(and --experts for a multi-head checkpoint).")


def dataset_label(args):
    """The dataset as run names and the codes cache name it: --dataset, plus _ltRHO for --imbalance RHO."""
    return args.dataset + (f"_lt{args.imbalance:g}" if args.imbalance != 1 else "")


def run_loss_label(args):
    """loss.loss_label of this run: the loss, its hierarchy (K clusters or the given file's name), its heads."""
    hierarchy = Path(args.hierarchy_file).stem if args.hierarchy_file else args.hierarchy
    return loss_label(args.loss, hierarchy, args.experts)


def codes_key(run):
    """What cached codes depend on: the checkpoint's bytes (hashed), the data flags and, with several
    heads, which head (or their mean) gives the codes."""
    args = run.args
    reading = {"inference_head": str(args.inference_head)} if args.experts > 1 else {}
    return cache.cache_key(run.files.checkpoint, dataset_label(args), args.backbone, args.hash_bit, args.seed,
                           args.subset, args.data_root, **reading)


def save_codes(run, codes, key):
    run.files.codes.parent.mkdir(parents=True, exist_ok=True)
    cache.save(run.files.codes, codes, key)


def checkpoint_codes(run, network, weights_loaded=False):
    """(CodeSet, cache key, whether it came from the cache) of the run's checkpoint. The cache is rewritten
    by rank 0 when the network had to encode, unless --no_save."""
    key = codes_key(run)
    codes = cache.load(run.files.codes, key)
    # Same flags but other split sizes means the data on disk changed since the codes were cached.
    sizes = (len(run.splits.query), len(run.splits.database))
    fresh = codes is not None and (len(codes.query_bits), len(codes.database_bits)) == sizes
    if broadcast_object(run.context, fresh):
        return codes, key, True
    if not weights_loaded:
        load_network_weights(network, run.files.checkpoint, hint=CHECKPOINT_HINT)
    codes = encode_splits(network, run.loaders, run.device, run.context)
    if run.writes_files:
        save_codes(run, codes, key)
    return codes, key, False


def checkpoint_metrics(run, codes, key, cached):
    """Every metric of the codes (hashing.metrics.metrics_of_codes) with a "run" record, written to
    OUTPUT_DIR/{run}.metrics.json unless --no_save."""
    args = run.args
    train_counts = (split_labels(run.splits.train) > 0).sum(dim=0).numpy()
    try:
        metrics = metrics_of_codes(codes, topk=run.topk, top_ns=args.top_n, train_counts=train_counts)
    except ValueError as exc:
        raise UserError(f"--top_n: {exc}") from None
    metrics["run"] = {"dataset": args.dataset, "backbone": args.backbone, "hash_bit": args.hash_bit,
                      "loss": run_loss_label(args), "seed": args.seed, "subset": args.subset,
                      "imbalance": args.imbalance, "experts": args.experts,
                      "inference_head": str(args.inference_head),
                      "checkpoint": str(run.files.checkpoint), "checkpoint_sha256": key["checkpoint_sha256"],
                      "codes": str(run.files.codes), "codes_from_cache": cached}
    if not args.no_save:
        write_json(run.files.metrics, metrics)
    return metrics


def report_evaluation(run, metrics, codes):
    """Print the metrics besides mAP and where they went; with --plots, draw the figures."""
    top_n = metrics["precision_at_top_n"]
    within = metrics["precision_within_radius"]
    print("precision@top-N: " + ", ".join(f"{n} {p:.4f}" for n, p in zip(top_n["n"], top_n["precision"])))
    print(f"precision within Hamming radius {within['radius']}: {within['precision']:.4f} "
          f"({within['retrieving']:.1%} of queries retrieve an item)")
    print(describe_buckets(metrics["long_tail"]["buckets"]))
    if not run.args.no_save:
        source = "reused (same checkpoint)" if metrics["run"]["codes_from_cache"] else "written"
        print(f"metrics {run.files.metrics}; codes {source} {metrics['run']['codes']}")
    if run.args.plots:
        draw_figures(run, metrics, codes)


def describe_buckets(buckets):
    """One line: mAP of the head / medium / tail classes by training frequency (docs/METHOD.md §8.3)."""
    parts = [f"{name} {'-' if buckets[name]['map'] is None else format(buckets[name]['map'], '.4f')} "
             f"({len(buckets[name]['classes'])} classes)" for name in BUCKETS]
    return "mAP by training frequency of the classes: " + ", ".join(parts)


def draw_figures(run, metrics, codes):
    """The paper's figures for this run as OUTPUT_DIR/{run}.{topn,pr,convergence,tsne}.png."""
    title = plots.describe_run(metrics["run"])
    runs = [(metrics["run"]["loss"], metrics)]
    paths = [plots.plot_top_n_precision(runs, run.files.figure("topn"), title),
             plots.plot_precision_recall(runs, run.files.figure("pr"), title)]
    try:
        log = read_run_log(run.files.event_log)
        paths.append(plots.plot_convergence([(metrics["run"]["loss"], log)], run.files.figure("convergence"), title))
    except (OSError, ValueError, KeyError):
        print(f"note: no readable training log {run.files.event_log}, so no convergence figure", file=sys.stderr)
    print(f"t-SNE of up to {plots.TSNE_SAMPLE} database codes...", file=sys.stderr)
    paths.append(plots.plot_tsne(codes.database_signs(), codes.database_label_matrix(), run.files.figure("tsne"),
                                 title, seed=run.args.seed))
    print("figures: " + ", ".join(str(path) for path in paths))


def search_images(run, network, codes):
    """--query: the --num_matches nearest database items of each image, printed and returned."""
    args, database = run.args, run.splits.database
    network.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(args.query), args.batch_size):
            images = query_batch(args.query[start:start + args.batch_size], database, run.input_size)
            outputs.append(network(images.to(run.device)).float().cpu().numpy())
    distances, indices = search(pack_signs(np.concatenate(outputs)), codes.database_bits, args.num_matches)
    name, labels = item_names(database), codes.database_label_matrix()
    results = []
    for path, row_distances, row_indices in zip(args.query, distances, indices):
        print(f"{path}: {len(row_indices)} nearest of {len(codes.database_bits)} database items ({args.hash_bit} bits)")
        print(f"  {'rank':>4}  {'hamming':>7}  {'labels':<12}  item")
        matches = []
        for rank, (distance, index) in enumerate(zip(row_distances, row_indices), start=1):
            match = {"rank": rank, "index": int(index), "distance": int(distance),
                     "labels": np.flatnonzero(labels[index]).tolist(), "item": name(int(index))}
            print(f"  {rank:>4}  {distance:>7}  {','.join(map(str, match['labels'])):<12}  {match['item']}")
            matches.append(match)
        results.append({"query": path, "matches": matches})
    return results


def warn_if_data_differs_from_training(run):
    """--test evaluates on the splits built from --seed/--subset; say so if training used others."""
    try:
        trained_args = read_run_log(run.files.event_log)["args"]
    except (OSError, ValueError, KeyError):
        return
    for flag in ("seed", "subset", "data_root"):
        if flag in trained_args and trained_args[flag] != getattr(run.args, flag):
            warn(f"{run.files.checkpoint} was trained with --{flag} {trained_args[flag]}, this run uses "
                 f"--{flag} {getattr(run.args, flag)}; the splits may differ and so may the mAP")


def run_checkpoint_tasks(run, network):
    """--test, --query and --export_index with the saved checkpoint; returns what they found."""
    args = run.args
    if args.test and run.context.is_main:
        warn_if_data_differs_from_training(run)
    if args.query:  # queries need the network even when the database codes are cached
        load_network_weights(network, run.files.checkpoint, hint=CHECKPOINT_HINT)
    codes, key, cached = checkpoint_codes(run, network, weights_loaded=bool(args.query))
    result = {"topk": run.topk}
    if not run.context.is_main:
        return result
    if args.test:
        metrics = checkpoint_metrics(run, codes, key, cached)
        report_evaluation(run, metrics, codes)
        print(f"mAP@{run.topk}: {metrics['map']:.4f}  ({args.dataset}, {args.backbone}, {args.hash_bit} bits, "
              f"{run.files.checkpoint})")
        result.update(map=metrics["map"], metrics=metrics)
    if args.query:
        result["matches"] = search_images(run, network, codes)
    if args.export_index:
        write_index(codes.database_bits, args.export_index)
        print(f"FAISS IndexBinaryFlat of {len(codes.database_bits)} database codes written to {args.export_index}")
        result["index"] = args.export_index
    return result


def report_best_checkpoint(run, network, best_codes):
    """After training: every metric and the cached codes of the best checkpoint, from its evaluation's
    codes when this process computed them, else by encoding the saved checkpoint. Returns the metrics
    (None on ranks other than 0)."""
    barrier(run.context)  # rank 0 has finished writing the checkpoint
    if best_codes is None:
        codes, key, _ = checkpoint_codes(run, network)
    elif run.context.is_main:
        codes, key = best_codes, codes_key(run)
        save_codes(run, codes, key)
    if not run.context.is_main:
        return None
    metrics = checkpoint_metrics(run, codes, key, False)
    report_evaluation(run, metrics, codes)
    return metrics
