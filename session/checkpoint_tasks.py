"""What a saved checkpoint is used for besides training: --test (every metric, the codes cache, the
figures), --query (search the database with image files) and --export_index (a FAISS index of the
database codes); and the report on the best checkpoint at the end of training.

The codes of a checkpoint come from OUTPUT_DIR/{run}.codes.npz when they were computed from the same
checkpoint bytes and data flags (hashing/cache.py); otherwise the network encodes both splits. Under
torchrun every rank encodes its shard; rank 0 computes, prints and writes.
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from data.base import split_labels
from data.fingerprint import split_fingerprint
from data.query_images import item_names, query_batch
from data.transforms import Preprocessing
from engine import describe_nested_maps, encode_splits
from hashing import cache
from hashing.evaluation import plots
from hashing.search.api import CLI_HINT
from hashing.codes import NonFiniteCodes, pack_signs
from hashing.evaluation.class_split import class_split_maps, describe_class_split_maps
from hashing.evaluation.metrics import BUCKETS, map_by_bits, metrics_of_codes
from hashing.search.exact import search, write_index
from utils.atomic import write_json
from utils.checkpoint import load_network_weights
from utils.dist import barrier, broadcast_object
from utils.errors import UserError
from utils.provenance import provenance
from utils.runlog import read_run_log, warn

from .files import dataset_label, run_loss_label
from .parts import described_data_files
from .shallow import hasher_codes, saved_hasher



def codes_key(run):
    """What cached codes depend on: the checkpoint's bytes (hashed), the data flags, the input size (the
    transforms), a digest of each evaluated split's labels and images (data/fingerprint.py) and, with several
    heads, which head (or their mean) gives the codes."""
    args = run.args
    settings = {"dataset": dataset_label(args), "backbone": args.backbone, "hash_bit": args.hash_bit,
                "seed": args.seed, "subset": args.subset, "data_root": str(Path(args.data_root).resolve()),
                "split": args.split, "cache": args.cache, "input_size": run.input_size,
                "query": split_fingerprint(run.splits.query), "database": split_fingerprint(run.splits.database)}
    if args.experts > 1:
        settings["inference_head"] = str(args.inference_head)
    if run.backbone.preprocessing != Preprocessing(run.input_size):  # the paper's (ImageNet's) keeps older keys
        settings["preprocessing"] = dataclasses.asdict(run.backbone.preprocessing)
    return cache.cache_key(run.files.checkpoint, settings)


def save_codes(run, codes, key):
    run.files.codes.parent.mkdir(parents=True, exist_ok=True)
    cache.save(run.files.codes, codes, key)


def checkpoint_codes(run, network, weights_loaded=False):
    """(CodeSet, cache key, whether it came from the cache) of the run's checkpoint. The cache is rewritten
    by rank 0 when the network had to encode, unless --no_save."""
    hasher = saved_hasher(run, network) if run.args.hasher else None  # its trunk checked before cached codes count
    key = codes_key(run)
    codes = cache.load(run.files.codes, key)
    if broadcast_object(run.context, codes is not None):
        return codes, key, True
    if run.files.codes.exists() and run.context.is_main:
        print(f"note: {run.files.codes} is damaged or was computed from another checkpoint or other data; "
              "encoding again", file=sys.stderr)
    try:
        if run.args.hasher:
            codes = hasher_codes(run, network, hasher)
        else:
            if not weights_loaded:
                load_network_weights(network, run.files.checkpoint, hint=CLI_HINT)
            codes = encode_splits(network, run.loaders, run.device, run.context)
    except NonFiniteCodes as exc:
        raise UserError(f"checkpoint {run.files.checkpoint} gives unusable codes ({exc}); retrain it") from None
    if run.writes:
        save_codes(run, codes, key)
    return codes, key, False


def checkpoint_metrics(run, codes, key, cached, selection=None):
    """Every metric of the codes (hashing.evaluation.metrics.metrics_of_codes) with a "run" record (and how training
    selected the checkpoint, when known), written to OUTPUT_DIR/{run}.metrics.json unless --no_save."""
    args = run.args
    train_counts = (split_labels(run.splits.train) > 0).sum(dim=0).numpy()
    try:
        metrics = metrics_of_codes(codes, topk=run.topk, top_ns=args.top_n, convention=run.convention,
                                   train_counts=train_counts)
    except ValueError as exc:
        raise UserError(f"--top_n: {exc}") from None
    lengths = [bits for bits in args.nested_bits or () if bits <= codes.hash_bit]
    if lengths:  # each nested length's mAP, the shorter from the prefixes of these codes (docs/METHOD.md §14)
        metrics["map_by_bits"] = map_by_bits(codes, lengths, run.topk, run.convention, metrics["map"])
    metrics["run"] = {"dataset": args.dataset, "backbone": args.backbone, "hash_bit": codes.hash_bit,
                      "loss": run_loss_label(args), "seed": args.seed, "subset": args.subset,
                      "imbalance": args.imbalance, "experts": args.experts,
                      "inference_head": str(args.inference_head),
                      "nested_bits": args.nested_bits, "prefix_bits": args.prefix_bits,
                      "checkpoint": str(run.files.checkpoint), "checkpoint_sha256": key["checkpoint_sha256"],
                      "codes": str(run.files.codes), "codes_from_cache": cached, "selection": selection,
                      "data_files": described_data_files(run)}
    if run.class_split is not None:
        metrics["class_split"] = {**run.class_split.as_record(run.spec.class_names),
                                  "map": class_split_maps(codes, run.class_split, run.topk, run.convention,
                                                          {"all": metrics["map"]})}
    metrics["provenance"] = provenance(run.device)
    if run.writes:
        write_json(run.files.metrics, metrics)
    return metrics


def report_evaluation(run, metrics, codes):
    """Print the metrics besides mAP and where they went; with --plots, draw the figures."""
    top_n = metrics["precision_at_top_n"]
    within = metrics["precision_within_radius"]
    print("precision@top-N: " + ", ".join(f"{n} {p:.4f}" for n, p in zip(top_n["n"], top_n["precision"])))
    print(f"precision within Hamming radius {within['radius']}: {within['precision']:.4f} "
          f"({within['retrieving']:.1%} of queries retrieve an item)")
    print(f"graded @{metrics['map_topk']}: NDCG {metrics['ndcg']:.4f}  ACG {metrics['acg']:.4f}  "
          f"WAP {metrics['wap']:.4f}")
    if run.convention.zero_hit == "skip":
        print(f"left out of the means (zero_hit=skip): {metrics['skipped_queries']} queries for mAP and WAP, "
              f"{metrics['ndcg_skipped_queries']} for NDCG")
    print(describe_buckets(metrics["long_tail"]["buckets"]))
    if "class_split" in metrics:
        print(describe_class_split_maps(metrics["class_split"]["map"], f"mAP@{metrics['map_topk']} by relevance:"))
    if run.saves:
        source = "reused (same checkpoint)" if metrics["run"]["codes_from_cache"] else "written"
        print(f"metrics {run.files.metrics}; codes {source} {metrics['run']['codes']}")
    if run.args.plots:
        draw_figures(run, metrics, codes)


def describe_buckets(buckets):
    """One line: mAP of the head / medium / tail classes by training frequency (docs/METHOD.md §9.2)."""
    parts = [f"{name} {'-' if buckets[name]['map'] is None else format(buckets[name]['map'], '.4f')} "
             f"({len(buckets[name]['classes'])} classes)" for name in BUCKETS]
    return "mAP by training frequency of the classes: " + ", ".join(parts)


def draw_figures(run, metrics, codes):
    """The paper's figures for this run as OUTPUT_DIR/{run}.{topn,pr,convergence,tsne}.{--plot_format}."""
    title = plots.describe_run(metrics["run"])
    runs = [(metrics["run"]["loss"], metrics)]
    paths = [plots.plot_top_n_precision(runs, run.files.figure("topn", run.args.plot_format), title),
             plots.plot_precision_recall(runs, run.files.figure("pr", run.args.plot_format), title)]
    try:
        log = read_run_log(run.files.event_log)
        paths.append(plots.plot_convergence([(metrics["run"]["loss"], log)],
                                            run.files.figure("convergence", run.args.plot_format), title))
    except (OSError, ValueError, KeyError, UserError):
        print(f"note: no readable training log {run.files.event_log}, so no convergence figure", file=sys.stderr)
    if len(codes.database_bits) < plots.TSNE_MIN_ITEMS:
        print(f"note: a t-SNE needs at least {plots.TSNE_MIN_ITEMS} database items, this database has "
              f"{len(codes.database_bits)}; no t-SNE figure", file=sys.stderr)
    else:
        print(f"t-SNE of up to {plots.TSNE_SAMPLE} database codes...", file=sys.stderr)
        paths.append(plots.plot_tsne(codes.database_signs(), codes.database_label_matrix(),
                                     run.files.figure("tsne", run.args.plot_format), title, seed=run.args.seed,
                                     class_names=run.spec.class_names))
    print("figures: " + ", ".join(str(path) for path in paths))


def query_split_index(run, item):
    """N of a --query item "DATASET:N" naming the N-th image of this run's query split (e.g. digits:3, a
    query mosaic of the embedded dataset), else None for an image file."""
    name, _, number = item.rpartition(":")
    if name != run.args.dataset or not number.isdigit():
        return None
    if int(number) >= len(run.splits.query):
        raise UserError(f"--query {item}: the query split of --dataset {name} has {len(run.splits.query)} images "
                        f"({name}:0 to {name}:{len(run.splits.query) - 1})")
    return int(number)


def query_image(run, item):
    """The preprocessed (3, S, S) image of a --query item: an image file, or DATASET:N (query_split_index)."""
    index = query_split_index(run, item)
    if index is not None:
        return run.splits.query[index][0]
    return query_batch([item], run.splits.database, run.backbone.preprocessing)[0]


def search_images(run, network, codes):
    """--query: the --num_matches nearest database items of each image, printed and returned."""
    args, database = run.args, run.splits.database
    network.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(args.query), args.batch_size):
            images = torch.stack([query_image(run, item) for item in args.query[start:start + args.batch_size]])
            outputs.append(network(images.to(run.device)).float().cpu().numpy())
    query_bits = pack_signs(np.concatenate(outputs)[:, :codes.hash_bit])  # --prefix_bits: the first bits
    distances, indices = search(query_bits, codes.database_bits, args.num_matches)
    name, labels, query_labels = item_names(database), codes.database_label_matrix(), codes.query_label_matrix()
    results = []
    for path, row_distances, row_indices in zip(args.query, distances, indices):
        index = query_split_index(run, path)
        own = None if index is None else np.flatnonzero(query_labels[index]).tolist()
        about = "" if own is None else f" (labels {','.join(map(str, own)) or 'none'})"
        print(f"{path}{about}: {len(row_indices)} nearest of {len(codes.database_bits)} database items "
              f"({codes.hash_bit} bits)")
        print(f"  {'rank':>4}  {'hamming':>7}  {'labels':<12}  item")
        matches = []
        for rank, (distance, index) in enumerate(zip(row_distances, row_indices), start=1):
            match = {"rank": rank, "index": int(index), "distance": int(distance),
                     "labels": np.flatnonzero(labels[index]).tolist(), "item": name(int(index))}
            print(f"  {rank:>4}  {distance:>7}  {','.join(map(str, match['labels'])):<12}  {match['item']}")
            matches.append(match)
        results.append({"query": path, "labels": own, "matches": matches})
    return results


def trained_selection(run):
    """How training selected the checkpoint (--select, the kept epoch), from its event log; None if unknown."""
    try:
        return read_run_log(run.files.event_log).get("selection")
    except (OSError, ValueError, UserError):
        return None


def settings_differing_from_training(run):
    """["--seed 1 (trained with 0)", ...]: the data flags under which --test evaluates other splits than
    the run was trained and evaluated on; empty when they agree or there is no training log."""
    try:
        trained_args = read_run_log(run.files.event_log)["args"]
    except (OSError, ValueError, KeyError, UserError):
        return []
    return [f"--{flag} {getattr(run.args, flag)} (trained with {trained_args[flag]})"
            for flag in ("seed", "subset", "data_root", "split")
            if flag in trained_args and trained_args[flag] != getattr(run.args, flag)]


def without_writing_when_settings_differ(run):
    """--test under other data settings than the run's: the figures are printed, but the run's own
    metrics and codes are not replaced by them (the run is returned saving nothing)."""
    differing = settings_differing_from_training(run) if run.args.test and run.saves else []
    if not differing:
        return run
    warn(f"{run.files.checkpoint} was trained under other settings than {', '.join(differing)}; the splits may "
         f"differ and so may the mAP, so {run.files.metrics.name} and {run.files.codes.name} are left as they are")
    return dataclasses.replace(run, saves=False)


def run_checkpoint_tasks(run, network):
    """--test, --query and --export_index with the saved checkpoint; returns what they found."""
    if run.context.is_main:
        run = without_writing_when_settings_differ(run)
    run = dataclasses.replace(run, saves=broadcast_object(run.context, run.saves))
    args = run.args
    if args.query:  # queries need the network even when the database codes are cached
        for item in args.query:  # a bad DATASET:N before any work
            query_split_index(run, item)
        load_network_weights(network, run.files.checkpoint, hint=CLI_HINT)
    codes, key, cached = checkpoint_codes(run, network, weights_loaded=bool(args.query))
    if args.prefix_bits:  # the cache keeps the whole codes; the run's metrics stay those of the whole code
        codes, run = codes.prefix(args.prefix_bits), dataclasses.replace(run, saves=False)
    result = {"topk": run.topk}
    if not run.context.is_main:
        return result
    if args.test:
        metrics = checkpoint_metrics(run, codes, key, cached, trained_selection(run))
        report_evaluation(run, metrics, codes)
        print(f"{run.map_name}: {metrics['map']:.4f}  ({args.dataset}, {args.backbone}, {codes.hash_bit} bits"
              f"{' of ' + str(args.hash_bit) if args.prefix_bits else ''}, {run.files.checkpoint})"
              f"{describe_nested_maps(metrics.get('map_by_bits'), '; ')}")
        result.update(map=metrics["map"], metrics=metrics, map_by_bits=metrics.get("map_by_bits"))
    if args.query:
        result["matches"] = search_images(run, network, codes)
    if run.files.index:
        write_index(codes.database_bits, run.files.index)
        print(f"FAISS IndexBinaryFlat of {len(codes.database_bits)} database codes written to {run.files.index}")
        result["index"] = str(run.files.index)
    return result


def report_best_checkpoint(run, network, best_codes, selection):
    """After training: every metric and the cached codes of the kept checkpoint, from its evaluation's
    codes when this process computed them, else by encoding the saved checkpoint; `selection` says how
    it was kept (--select). Returns the metrics (None on ranks other than 0)."""
    barrier(run.context)  # rank 0 has finished writing the checkpoint
    if best_codes is None:
        codes, key, _ = checkpoint_codes(run, network)
    elif run.context.is_main:
        codes, key = best_codes, codes_key(run)
        save_codes(run, codes, key)
    if not run.context.is_main:
        return None
    metrics = checkpoint_metrics(run, codes, key, False, selection)
    report_evaluation(run, metrics, codes)
    return metrics
