"""Train and evaluate deep hashing networks for multi-label image retrieval with the HyP2 loss.

    python retrieval.py --dataset digits --backbone small --hash_bit 48 --epochs 30    # train
    python retrieval.py --dataset digits --backbone small --hash_bit 48 --test         # re-evaluate
    python retrieval.py --dataset digits --backbone small --hash_bit 48 --query a.png  # search
"""
import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from data import DATASETS, get_dataset_spec
from loss import (HIERARCHY_COARSE_WEIGHT, HIERARCHY_REFRESH_EVERY, LOSSES, PROXY_LOSSES, HierarchicalProxyLoss,
                  build_loss, tunable_hyperparameters)
from network import BACKBONES, build_network
from utils import codes_cache, codetable
from utils.atomic import ensure_writable_dir, write_json
from utils.checkpoint import load_network_weights, read_train_state, save_state_dict, save_train_state
from utils.device import select_device
from utils.dist import (DistContext, all_true, barrier, broadcast_object, gather_objects, gather_rows,
                        init_distributed, shard_bounds, shutdown, state_fingerprint, sum_over_ranks, sync_buffers)
from utils.errors import TrainingInterrupted, UserError, run_reporting_errors
from utils.metrics import map_at_k, retrieval_metrics
from utils.pretrained import imagenet_state_dict
from utils.query_images import item_names, query_batch
from utils.reproducibility import (capture_rng_state, loader_generator, restore_rng_state, seed_everything,
                                   seed_worker)
from utils.search import search, write_index
from utils.runlog import RunLog


CHECKPOINT_HINT = "Pass the --backbone and --hash_bit it was trained with."


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text):
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="HyP2 loss deep hashing: train a hash network and evaluate mAP@K by Hamming ranking.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # The paper code's flags, names and defaults.
    parser.add_argument("--dataset", default="voc2007", choices=list(DATASETS), help="dataset")
    parser.add_argument("--backbone", default="googlenet", choices=list(BACKBONES), help="backbone network")
    parser.add_argument("--hash_bit", type=positive_int, default=48, help="number of hash bits n")
    parser.add_argument("--batch_size", type=positive_int, default=100, help="mini-batch size")
    parser.add_argument("--epochs", type=positive_int, default=100, help="training epochs")
    parser.add_argument("--beta", type=float, default=0.5, help="weight of the irrelevant-pair term (0: proxy only)")
    parser.add_argument("--rate", type=float, default=0.02, help="learning rate of the proxies")
    parser.add_argument("--seed", type=int, default=0, help="random seed (data split, init, batches)")
    parser.add_argument("--retrieve", type=non_negative_int, default=0,
                        help="K of mAP@K; 0 = the dataset's default")
    parser.add_argument("--no_save", action="store_true", help="write no checkpoint or log")
    parser.add_argument("--test", action="store_true", help="evaluate the saved checkpoint instead of training")
    parser.add_argument("--cuda", type=non_negative_int, default=0, help="GPU id when running on CUDA")
    # Additions.
    parser.add_argument("--data_root", default="./data", help="folder holding the datasets")
    parser.add_argument("--output_dir", default="./result", help="folder for checkpoints and logs")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to write/test (default: OUTPUT_DIR/{dataset}_{backbone}_{hash_bit}[_{loss}].ckpt)")
    parser.add_argument("--workers", type=int, default=-1,
                        help="DataLoader worker processes; -1 = 0 for in-memory datasets, else min(8, CPUs)")
    parser.add_argument("--lr", type=float, default=0, help="network learning rate; 0 = the backbone's default")
    parser.add_argument("--eval_every", type=positive_int, default=5, help="evaluate every N epochs (and at the end)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--zeta", type=float, default=None, help="override the threshold zeta of the code table")
    parser.add_argument("--codetable", default=None, metavar="XLSX",
                        help="read zeta from the paper's codetable.xlsx (cross-check with the built-in table)")
    parser.add_argument("--subset", type=non_negative_int, default=0,
                        help="use only the first N images of each split (smoke tests); 0 = all")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue an interrupted run from its training state (default "
                             "OUTPUT_DIR/{run}.last.pt, written after every epoch)")
    parser.add_argument("--amp", nargs="?", const="auto", choices=["auto", "bf16", "fp16"], default=None,
                        help="mixed precision on CUDA (bf16 if supported, else fp16 with loss scaling); "
                             "ignored on the CPU")
    # Evaluation suite, figures and search.
    parser.add_argument("--top_n", type=positive_int, nargs="+", default=None, metavar="N",
                        help="N of precision@top-N (default: 100, 200, ..., 1000, or ten steps up to a smaller database)")
    parser.add_argument("--plots", action="store_true",
                        help="draw the figures (top-N, PR, convergence, t-SNE) as OUTPUT_DIR/{run}.*.png")
    parser.add_argument("--query", nargs="+", default=None, metavar="IMAGE",
                        help="search the database with these images using the saved checkpoint")
    parser.add_argument("--topk", type=positive_int, default=10, help="matches printed per --query image")
    parser.add_argument("--export_index", default=None, metavar="PATH",
                        help="write the database codes as a FAISS IndexBinaryFlat to PATH")
    parser.add_argument("--cache", action="store_true",
                        help="decode each image once, resized, into a uint8 memory-mapped file under the data root, "
                             "reused by later epochs and runs")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="check every image once before training and leave out missing or undecodable ones "
                             "(default: stop at the first, naming the file)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", default=None, metavar="PATH",
                         help="the backbone's ImageNet weights (a torchvision state_dict file); default: torchvision's "
                              "file from the torch hub cache, downloaded if missing")
    weights.add_argument("--no_pretrained", action="store_true", help="train the backbone from scratch")
    add_loss_arguments(parser)
    return parser


def loss_flag(loss_name, hyperparameter):
    """The flag (without dashes) of a loss's hyper-parameter: HyP2's beta keeps the paper's --beta."""
    return "beta" if (loss_name, hyperparameter) == ("hyp2", "beta") else f"{loss_name}_{hyperparameter}"


def add_loss_arguments(parser):
    """--loss, one flag per hyper-parameter of every loss (published defaults), and the hierarchy flags."""
    parser.add_argument("--loss", default="hyp2", choices=list(LOSSES), help="training loss")
    group = parser.add_argument_group("loss hyper-parameters (used only by their loss)")
    for name in LOSSES:
        for hyperparameter, default in tunable_hyperparameters(name).items():
            flag = loss_flag(name, hyperparameter)
            if flag != "beta":  # --beta is defined with the paper's flags
                group.add_argument(f"--{flag}", type=type(default), default=default,
                                   help=f"{name}: {LOSSES[name].HELP[hyperparameter]}")
    group = parser.add_argument_group("hierarchical proxies (HPL) on top of " + ", ".join(PROXY_LOSSES))
    group.add_argument("--hierarchy", type=non_negative_int, default=0, metavar="K",
                       help="number of coarse clusters of the class proxies; 0 = no hierarchy")
    group.add_argument("--hierarchy_every", type=positive_int, default=HIERARCHY_REFRESH_EVERY,
                       help="re-cluster the proxies every N training iterations")
    group.add_argument("--hierarchy_weight", type=float, default=HIERARCHY_COARSE_WEIGHT,
                       help="weight of the coarse level's loss")


def loss_label(args):
    """The loss as output files and tables name it: the loss, plus _hplK with hierarchical proxies."""
    return args.loss + (f"_hpl{args.hierarchy}" if args.hierarchy else "")


def run_prefix(args):
    """OUTPUT_DIR/{dataset}_{backbone}_{bits}, plus _{loss} for losses other than hyp2 (the paper's names)."""
    label = loss_label(args)
    return Path(args.output_dir) / (f"{args.dataset}_{args.backbone}_{args.hash_bit}"
                                    + ("" if label == "hyp2" else f"_{label}"))


def build_criterion(args, spec):
    """The loss of --loss with its flags, wrapped in hierarchical proxies when --hierarchy K > 0."""
    defaults = LOSSES[args.loss].published_defaults()
    settings = {name: getattr(args, loss_flag(args.loss, name)) for name in tunable_hyperparameters(args.loss)}
    if "zeta" in defaults:
        try:
            settings["zeta"] = codetable.resolve_zeta(args.hash_bit, spec.num_classes, args.zeta, args.codetable)
        except ValueError as exc:
            raise UserError(f"--hash_bit {args.hash_bit}: {exc}; or pass --zeta VALUE") from None
    if "seed" in defaults:
        settings["seed"] = args.seed
    criterion = build_loss(args.loss, spec.num_classes, args.hash_bit, **settings)
    if not args.hierarchy:
        return criterion
    if args.loss not in PROXY_LOSSES:
        raise UserError(f"--hierarchy needs a proxy loss ({', '.join(PROXY_LOSSES)}), not --loss {args.loss}")
    if not 2 <= args.hierarchy < spec.num_classes:
        raise UserError(f"--hierarchy {args.hierarchy}: the coarse level needs 2 to {spec.num_classes - 1} "
                        f"clusters for the {spec.num_classes} classes of {args.dataset}")
    return HierarchicalProxyLoss(criterion, args.hierarchy, args.hierarchy_every, args.hierarchy_weight, args.seed)


def describe_loss(label, criterion):
    """'loss hyp2 (beta 0.5, zeta 0)' for the header line."""
    settings = ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                         for name, value in criterion.hyperparameters().items())
    return f"loss {label} ({settings})"


def build_splits(spec, args, input_size):
    try:
        splits = spec.build(Path(args.data_root), args.seed, input_size, cache=args.cache,
                            skip_bad_images=args.skip_bad_images)
    except NotImplementedError as exc:
        raise UserError(str(exc)) from None
    if args.subset:
        splits = type(splits)(*(Subset(part, range(min(args.subset, len(part)))) for part in splits))
    for name, part in splits._asdict().items():
        if len(part) == 0:
            raise UserError(f"the {name} split of --dataset {args.dataset} is empty; check the data under "
                            f"--data_root {args.data_root} (see README, Datasets)")
    return splits


def uses_checkpoint(args):
    """--test, --query and --export_index work with the saved checkpoint instead of training."""
    return bool(args.test or args.query or args.export_index)


def make_network(args, backbone, say=print):
    """The hash network, starting from ImageNet weights when training (--test loads a whole checkpoint)."""
    if args.weights and not backbone.pretrained_available:
        raise UserError(f"--weights: the {args.backbone} backbone has no ImageNet weights to load")
    if not backbone.pretrained_available or args.no_pretrained or uses_checkpoint(args):
        return build_network(args.backbone, args.hash_bit)
    state, source = imagenet_state_dict(backbone.imagenet_weights, args.backbone, args.weights)
    say(f"{args.backbone}: ImageNet weights from {source}")
    try:
        return build_network(args.backbone, args.hash_bit, pretrained=state)
    except ValueError as exc:
        raise UserError(f"cannot use {source} for --backbone {args.backbone}: {exc}") from None


def make_loaders(splits, args, spec, device, context=DistContext()):
    """Train loader (each rank a 1/world share of every global batch) and per-rank eval shards.

    Shuffling and worker seeds are functions of (--seed, epoch) via set_epoch(), and every loader has
    its own generator, so evaluation never draws from the global RNG and a resumed run replays the
    same batches.
    """
    workers = args.workers if args.workers >= 0 else (0 if spec.in_memory else min(8, os.cpu_count() or 1))
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                  persistent_workers=workers > 0)
    sampler = DistributedSampler(splits.train, num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=args.seed)
    train = DataLoader(splits.train, batch_size=max(1, args.batch_size // context.world_size), sampler=sampler,
                       generator=loader_generator(args.seed), **common)

    def eval_loader(dataset):
        start, stop = shard_bounds(len(dataset), args.batch_size, context)
        shard = dataset if (start, stop) == (0, len(dataset)) else Subset(dataset, range(start, stop))
        return DataLoader(shard, batch_size=args.batch_size, shuffle=False,
                          generator=loader_generator(args.seed), **common)

    return train, eval_loader(splits.query), eval_loader(splits.database)


def set_epoch(train_loader, criterion, seed, epoch):
    train_loader.sampler.set_epoch(epoch)
    train_loader.generator.manual_seed(seed * 1_000_003 + epoch)  # worker seeds of this epoch
    if hasattr(criterion, "set_epoch"):
        criterion.set_epoch(epoch)


def warn_if_data_differs_from_training(checkpoint, args):
    """--test evaluates on the splits built from --seed/--subset; say so if training used others."""
    record_path = checkpoint.with_suffix(".json")
    try:
        trained_args = json.loads(record_path.read_text())["args"]
    except (OSError, ValueError, KeyError):
        return
    for flag in ("seed", "subset", "data_root"):
        if flag in trained_args and trained_args[flag] != getattr(args, flag):
            print(f"warning: {checkpoint} was trained with --{flag} {trained_args[flag]}, this run uses "
                  f"--{flag} {getattr(args, flag)}; the splits may differ and so may the mAP", file=sys.stderr)


def check_output_flags(args):
    if args.plots and args.no_save:
        raise UserError("--plots writes figures and --no_save writes nothing: drop one of them")


def writes_files(args, context):
    return context.is_main and not args.no_save


def codes_key(args, checkpoint):
    """What cached codes depend on: the checkpoint's bytes (hashed) and the data flags."""
    return codes_cache.cache_key(checkpoint, args.dataset, args.backbone, args.hash_bit, args.seed, args.subset,
                                 args.data_root)


def save_codes(codes, args, key):
    """Write OUTPUT_DIR/{run}.codes.npz under `key` (see codes_key)."""
    run_prefix(args).parent.mkdir(parents=True, exist_ok=True)
    codes_cache.save(run_prefix(args).with_suffix(".codes.npz"), codes, key)


def codes_of_checkpoint(network, split_sizes, loaders, device, args, checkpoint, context, weights_loaded=False):
    """Query and database codes of `checkpoint`: (CodeSet, cache key, whether they came from the cache).

    They come from OUTPUT_DIR/{run}.codes.npz when it was computed from the same checkpoint bytes and data
    flags; otherwise the network encodes both splits (sharded over ranks) and rank 0 rewrites the file,
    unless --no_save.
    """
    key = codes_key(args, checkpoint)
    codes = codes_cache.load(run_prefix(args).with_suffix(".codes.npz"), key)
    # Same flags but other split sizes means the data on disk changed since the codes were cached.
    fresh = codes is not None and (len(codes.query_bits), len(codes.database_bits)) == split_sizes
    if broadcast_object(context, fresh):
        return codes, key, True
    if not weights_loaded:
        load_network_weights(network, checkpoint, hint=CHECKPOINT_HINT)
    codes = codes_cache.CodeSet.from_outputs(*encode_splits(network, loaders[1], loaders[2], device, context))
    if writes_files(args, context):
        save_codes(codes, args, key)
    return codes, key, False


def checkpoint_metrics(codes, key, cached, args, topk, checkpoint):
    """Every metric of the codes (utils.metrics.retrieval_metrics) with a "run" record, written to
    OUTPUT_DIR/{run}.metrics.json unless --no_save."""
    try:
        metrics = retrieval_metrics(codes.query_codes(), codes.query_labels, codes.database_codes(),
                                    codes.database_labels, topk=topk, top_ns=args.top_n)
    except ValueError as exc:
        raise UserError(f"--top_n: {exc}") from None
    prefix = run_prefix(args)
    metrics["run"] = {"dataset": args.dataset, "backbone": args.backbone, "hash_bit": args.hash_bit,
                      "loss": loss_label(args), "seed": args.seed, "subset": args.subset,
                      "checkpoint": str(checkpoint), "checkpoint_sha256": key["checkpoint_sha256"],
                      "codes": str(prefix.with_suffix(".codes.npz")), "codes_from_cache": cached}
    if not args.no_save:
        write_json(prefix.with_suffix(".metrics.json"), metrics)
    return metrics


def report_evaluation(metrics, codes, args):
    """Print the metrics besides mAP and where they went; with --plots, draw the figures."""
    top_n = metrics["precision_at_top_n"]
    within = metrics["precision_within_radius"]
    print("precision@top-N: " + ", ".join(f"{n} {p:.4f}" for n, p in zip(top_n["n"], top_n["precision"])))
    print(f"precision within Hamming radius {within['radius']}: {within['precision']:.4f} "
          f"({within['retrieving']:.1%} of queries retrieve an item)")
    if not args.no_save:
        source = "reused (same checkpoint)" if metrics["run"]["codes_from_cache"] else "written"
        print(f"metrics {run_prefix(args).with_suffix('.metrics.json')}; codes {source} {metrics['run']['codes']}")
    if args.plots:
        draw_figures(args, metrics, codes)


def draw_figures(args, metrics, codes):
    """The paper's figures for this run as OUTPUT_DIR/{run}.{topn,pr,convergence,tsne}.png."""
    from utils import plots
    prefix = run_prefix(args)
    title = plots.describe_run(metrics["run"])
    runs = [(metrics["run"]["loss"], metrics)]
    paths = [plots.plot_top_n_precision(runs, prefix.with_suffix(".topn.png"), title),
             plots.plot_precision_recall(runs, prefix.with_suffix(".pr.png"), title)]
    log_path = prefix.with_suffix(".json")
    try:
        log = json.loads(log_path.read_text())
        paths.append(plots.plot_convergence([(metrics["run"]["loss"], log)], prefix.with_suffix(".convergence.png"),
                                            title))
    except (OSError, ValueError, KeyError):
        print(f"note: no readable training log {log_path}, so no convergence figure", file=sys.stderr)
    print(f"t-SNE of up to {plots.TSNE_SAMPLE} database codes...", file=sys.stderr)
    paths.append(plots.plot_tsne(codes.database_codes(), codes.database_labels, prefix.with_suffix(".tsne.png"),
                                 title, seed=args.seed))
    print("figures: " + ", ".join(str(path) for path in paths))


def search_images(model, codes, database, device, args, input_size):
    """--query: the --topk nearest database items of each image, printed and returned."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(args.query), args.batch_size):
            images = query_batch(args.query[start:start + args.batch_size], database, input_size)
            outputs.append(model(images.to(device)).float().cpu().numpy())
    distances, indices = search(codes_cache.pack_sign_bits(np.concatenate(outputs)), codes.database_bits, args.topk)
    name = item_names(database)
    results = []
    for path, row_distances, row_indices in zip(args.query, distances, indices):
        print(f"{path}: {len(row_indices)} nearest of {len(codes.database_bits)} database items "
              f"({args.hash_bit} bits)")
        print(f"  {'rank':>4}  {'hamming':>7}  {'labels':<12}  item")
        matches = []
        for rank, (distance, index) in enumerate(zip(row_distances, row_indices), start=1):
            labels = np.flatnonzero(codes.database_labels[index]).tolist()
            matches.append({"rank": rank, "index": int(index), "distance": int(distance), "labels": labels,
                            "item": name(int(index))})
            print(f"  {rank:>4}  {distance:>7}  {','.join(map(str, labels)):<12}  {name(int(index))}")
        results.append({"query": path, "matches": matches})
    return results


def use_checkpoint(network, splits, loaders, device, args, topk, checkpoint, input_size, context):
    """--test (metrics), --query (search) and --export_index (FAISS index) with the saved checkpoint.

    Under torchrun every rank encodes its shard; rank 0 computes, prints and writes.
    """
    if args.test and context.is_main:
        warn_if_data_differs_from_training(checkpoint, args)
    if args.query:  # queries need the network even when the database codes are cached
        load_network_weights(network, checkpoint, hint=CHECKPOINT_HINT)
    codes, key, cached = codes_of_checkpoint(network, (len(splits.query), len(splits.database)), loaders, device,
                                             args, checkpoint, context, weights_loaded=bool(args.query))
    result = {"topk": topk}
    if not context.is_main:
        return result
    if args.test:
        metrics = checkpoint_metrics(codes, key, cached, args, topk, checkpoint)
        report_evaluation(metrics, codes, args)
        print(f"mAP@{topk}: {metrics['map']:.4f}  ({args.dataset}, {args.backbone}, {args.hash_bit} bits, "
              f"{checkpoint})")
        result.update(map=metrics["map"], metrics=metrics)
    if args.query:
        result["matches"] = search_images(network, codes, splits.database, device, args, input_size)
    if args.export_index:
        write_index(codes.database_bits, args.export_index)
        print(f"FAISS IndexBinaryFlat of {len(codes.database_bits)} database codes written to {args.export_index}")
        result["index"] = args.export_index
    return result


class HashingObjective(nn.Module):
    """Network and loss as one module, so DDP also synchronises the loss's learnable state (proxies)."""

    def __init__(self, network, criterion):
        super().__init__()
        self.network = network
        self.criterion = criterion

    def forward(self, images, labels):
        codes = self.network(images)
        with torch.autocast(device_type=codes.device.type, enabled=False):  # the loss in float32
            return self.criterion(codes.float(), labels)


@dataclass
class MixedPrecision:
    """--amp: autocast dtype (None = off) and the gradient scaler fp16 needs."""
    dtype: torch.dtype = None
    scaler: torch.amp.GradScaler = None

    @classmethod
    def from_flag(cls, amp, device):
        if amp is None or device.type != "cuda":
            return cls()  # autocast and scaling only pay off on a GPU
        if amp == "auto":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        return cls(dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None)

    def autocast(self, device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


class NonFiniteLoss(Exception):
    def __init__(self, value, epoch, step):
        super().__init__(f"the loss became {value} in epoch {epoch}, iteration {step}")


def train_one_epoch(objective, loader, optimizer, device, epoch, epochs, precision, context):
    """One pass over the training set; returns the mean loss per sample over all ranks."""
    objective.train()
    total = torch.zeros((), device=device)
    seen = 0
    progress = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, unit="batch", dynamic_ncols=True,
                    disable=not context.is_main)
    for step, (images, labels) in enumerate(progress, start=1):
        images = to_device(images, device)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast(device):
            loss = objective(images, labels)
        if not all_true(context, torch.isfinite(loss).item(), device):
            raise NonFiniteLoss(loss.item(), epoch, step)
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += loss.detach() * len(images)
        seen += len(images)
        if step % 10 == 1:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    total, seen = sum_over_ranks(context, [total.item(), seen], device)
    return total / max(seen, 1)


def to_device(images, device):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


@torch.inference_mode()
def encode(network, loader, device, desc, context=DistContext()):
    """Real-valued codes (N, n) and labels (N, C) of a dataset, on the CPU, gathered over ranks."""
    network.eval()
    codes, labels = [], []
    for images, targets in tqdm(loader, desc=desc, leave=False, unit="batch", dynamic_ncols=True,
                                disable=not context.is_main):
        codes.append(network(to_device(images, device)).float().cpu())
        labels.append(targets.float())
    if not codes:  # a rank whose shard is empty
        codes, labels = [torch.empty(0, 0)], [torch.empty(0, 0)]
    return gather_rows(context, torch.cat(codes), device), gather_rows(context, torch.cat(labels), device)


def encode_splits(network, query_loader, database_loader, device, context=DistContext()):
    """(query codes, query labels, database codes, database labels), gathered over ranks."""
    return (*encode(network, query_loader, device, "encode queries", context),
            *encode(network, database_loader, device, "encode database", context))


def evaluate(network, query_loader, database_loader, device, topk, context=DistContext()):
    """mAP@topk of the query set against the database by Hamming ranking (the same on every rank),
    and the codes it was computed from."""
    outputs = encode_splits(network, query_loader, database_loader, device, context)
    mean_ap = map_at_k(*outputs, topk) if context.is_main else None
    return broadcast_object(context, mean_ap), outputs


@dataclass
class Progress:
    """Where training stands after the last completed epoch (saved in .last.pt)."""
    epoch: int = 0
    best_map: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0


def train(trainable, optimizer, scheduler, precision, loaders, device, args, topk, paths, log, progress, context):
    """The training loop: evaluate every --eval_every epochs, keep the best checkpoint, and write the
    resumable state after every epoch. `trainable` is the HashingObjective, DDP-wrapped when distributed.

    Returns the Progress and the codes of the best epoch's evaluation (None if it predates a resume).
    """
    train_loader, query_loader, database_loader = loaders
    objective = trainable.module if isinstance(trainable, DistributedDataParallel) else trainable
    network, criterion = objective.network, objective.criterion
    writes = writes_files(args, context)
    best_outputs = None
    for epoch in range(progress.epoch + 1, args.epochs + 1):
        started = time.perf_counter()
        set_epoch(train_loader, criterion, args.seed, epoch)
        loss = train_one_epoch(trainable, train_loader, optimizer, device, epoch, args.epochs, precision,
                               context)
        sync_buffers(context, objective)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        progress.train_seconds += time.perf_counter() - started
        message = (f"epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}  lr {lr:.3g}  "
                   f"train {progress.train_seconds:.1f}s")

        mean_ap = None
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            mean_ap, outputs = evaluate(network, query_loader, database_loader, device, topk, context)
            if mean_ap > progress.best_map:
                progress.best_map, progress.best_epoch = mean_ap, epoch
                best_outputs = outputs
                if writes:
                    save_state_dict(network, paths.checkpoint)
                log.best(mean_ap, epoch, str(paths.checkpoint))
            message += f"  mAP@{topk} {mean_ap:.4f}  (best {progress.best_map:.4f} @ epoch {progress.best_epoch})"
        if context.is_main:
            tqdm.write(message)
        log.line(message)
        log.epoch(epoch, loss, lr, progress.train_seconds, mean_ap)
        progress.epoch = epoch
        if writes:
            save_train_state(paths.last, {
                "network": network.state_dict(), "loss": criterion.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": precision.scaler.state_dict() if precision.scaler else None,
                "progress": asdict(progress), "log": {"record": log.record, "lines": log.lines},
                "rng": capture_rng_state()}, vars(args))
            log.save()
    return progress, best_outputs


def resume(paths, args, objective, optimizer, scheduler, precision, log, device):
    """Restore everything train() saved in .last.pt; returns the Progress to continue from."""
    state, changed = read_train_state(Path(args.resume) if args.resume else paths.last, vars(args))
    for change in changed:
        print(f"warning: resuming with {change}; the result will differ from an uninterrupted run",
              file=sys.stderr)
    objective.network.load_state_dict(state["network"])
    objective.criterion.load_state_dict(state["loss"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if precision.scaler is not None and state["scaler"] is not None:
        precision.scaler.load_state_dict(state["scaler"])
    progress = Progress(**state["progress"])
    saved_log = state["log"]
    log.record.update({key: saved_log["record"][key] for key in ("epochs", "best", "train_seconds")})
    log.lines = list(saved_log["lines"]) + [f"resumed after epoch {progress.epoch}"]
    restore_rng_state(state["rng"])
    objective.to(device)
    return progress


@dataclass(frozen=True)
class RunPaths:
    checkpoint: Path
    last: Path


def run_paths(args):
    prefix = run_prefix(args)
    return RunPaths(checkpoint=Path(args.checkpoint) if args.checkpoint else prefix.with_suffix(".ckpt"),
                    last=prefix.with_suffix(".last.pt"))


def main(args):
    check_output_flags(args)
    device = select_device(args.device, args.cuda)
    context = init_distributed(device.type)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    try:
        return run(args, device, context)
    finally:
        shutdown(context)


def run(args, device, context):
    seed_everything(args.seed)
    say = print if context.is_main else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    spec = get_dataset_spec(args.dataset)
    backbone = BACKBONES[args.backbone]
    splits = build_splits(spec, args, backbone.input_size)
    spec = spec.with_classes_of(splits)
    topk = retrieval_depth(args, spec, len(splits.database), say)
    loaders = make_loaders(splits, args, spec, device, context)
    # Rank 0 fetches ImageNet weights first, so that ranks do not download the same file at once.
    if context.is_main:
        network = make_network(args, backbone, say)
    barrier(context)
    if not context.is_main:
        network = make_network(args, backbone, say)
    network = network.to(device)
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    paths = run_paths(args)

    if uses_checkpoint(args):
        return use_checkpoint(network, splits, loaders, device, args, topk, paths.checkpoint,
                              backbone.input_size, context)

    criterion = build_criterion(args, spec)
    loss_settings = criterion.hyperparameters()
    zeta = loss_settings.get("zeta")
    objective = HashingObjective(network, criterion).to(device)
    lr = args.lr or backbone.default_lr
    param_groups = [{"params": network.parameters(), "lr": lr}]
    loss_parameters = list(criterion.parameters())
    if loss_parameters:  # SGD rejects an empty group, and losses with fixed targets have no parameters
        param_groups.append({"params": loss_parameters, "lr": args.rate})
    optimizer = torch.optim.SGD(param_groups, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    precision = MixedPrecision.from_flag(args.amp, device)

    if not args.no_save and context.is_main:
        ensure_writable_dir(args.output_dir)
        ensure_writable_dir(paths.checkpoint.parent, "--checkpoint")
    info = {"num_classes": spec.num_classes, "topk": topk, "zeta": zeta, "device": str(device),
            "world_size": context.world_size, "amp": str(precision.dtype),
            "loss": {"name": loss_label(args), **loss_settings},
            "sizes": {name: len(part) for name, part in splits._asdict().items()}}
    log = RunLog(run_prefix(args), vars(args), info, enabled=not args.no_save and context.is_main)
    progress = Progress()
    if args.resume is not None:
        progress = resume(paths, args, objective, optimizer, scheduler, precision, log, device)
        say(f"resuming after epoch {progress.epoch} "
            f"(best mAP@{topk} {progress.best_map:.4f} at epoch {progress.best_epoch})")
    trainable = objective
    if context.enabled:
        trainable = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    header = (f"{args.dataset} / {args.backbone} / {args.hash_bit} bits: {info['sizes']}, "
              f"{describe_loss(loss_label(args), criterion)}, lr {lr:g}"
              f"{f' (proxies {args.rate:g})' if loss_parameters else ''}, device {device}"
              + (f" x {context.world_size} processes" if context.enabled else ""))
    say(header)
    log.line(header)

    try:
        progress, best_outputs = train(trainable, optimizer, scheduler, precision, loaders, device, args, topk,
                                       paths, log, progress, context)
    except NonFiniteLoss as exc:
        best = (f"the best checkpoint {paths.checkpoint} (epoch {progress.best_epoch}, mAP {progress.best_map:.4f}) "
                "is intact" if progress.best_epoch else "no checkpoint was saved yet")
        raise UserError(f"{exc}: lower --lr (now {lr:g}) or --rate (now {args.rate:g}); {best}") from None
    except KeyboardInterrupt:
        if progress.epoch and not args.no_save:
            raise TrainingInterrupted(f"interrupted; the state after epoch {progress.epoch} is in {paths.last}: "
                                      "rerun the same command with --resume to continue") from None
        raise TrainingInterrupted("interrupted before the first epoch finished; nothing to resume") from None

    fingerprints = gather_objects(context, state_fingerprint(objective))
    if context.enabled:
        log.record["rank_fingerprints"] = fingerprints
        if len(set(fingerprints)) > 1:
            say("warning: the ranks ended with different models", file=sys.stderr)
    if progress.best_epoch and not args.no_save:
        report_best_checkpoint(best_outputs, network, splits, loaders, device, args, topk, paths, context)
    summary = (f"best mAP@{topk} {progress.best_map:.4f} at epoch {progress.best_epoch}; "
               f"checkpoint {'not saved (--no_save)' if args.no_save else paths.checkpoint}; "
               f"training {progress.train_seconds:.1f}s")
    say(summary)
    log.line(summary)
    log.finish()
    return {"map": progress.best_map, "epoch": progress.best_epoch, "topk": topk,
            "train_seconds": progress.train_seconds}


def report_best_checkpoint(best_outputs, network, splits, loaders, device, args, topk, paths, context):
    """Every metric and the cached codes of the best checkpoint, from its evaluation's codes when this
    process computed them, else by encoding the saved checkpoint."""
    barrier(context)  # rank 0 has finished writing the checkpoint
    if best_outputs is None:
        codes, key, _ = codes_of_checkpoint(network, (len(splits.query), len(splits.database)), loaders, device,
                                            args, paths.checkpoint, context)
    elif context.is_main:
        codes = codes_cache.CodeSet.from_outputs(*best_outputs)
        key = codes_key(args, paths.checkpoint)
        save_codes(codes, args, key)
    if context.is_main:
        report_evaluation(checkpoint_metrics(codes, key, False, args, topk, paths.checkpoint), codes, args)


def retrieval_depth(args, spec, database_size, say):
    """K of mAP@K: --retrieve, else the dataset's default, else the whole database; clamped to it."""
    topk = args.retrieve or spec.default_topk or database_size
    if topk > database_size:
        if args.retrieve:
            say(f"warning: --retrieve {args.retrieve} exceeds the database ({database_size} items); "
                f"using K = {database_size}", file=sys.stderr)
        topk = database_size
    return topk


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    run_reporting_errors(lambda: main(args))


if __name__ == "__main__":
    cli()
