"""Train and evaluate deep hashing networks for multi-label image retrieval with the HyP2 loss.

    python retrieval.py --dataset digits --backbone small --hash_bit 48 --epochs 30    # train
    python retrieval.py --dataset digits --backbone small --hash_bit 48 --test         # re-evaluate
    python retrieval.py --dataset digits --backbone small --hash_bit 48 --query a.png  # search

This file only wires the parts: data/ (datasets), network.py, loss.py, engine.py (the training loop),
checkpoint_tasks.py (--test, --query, --export_index) and hashing/ (codes, metrics, search, zeta).
The method and every definition: docs/METHOD.md.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from checkpoint_tasks import dataset_label, report_best_checkpoint, run_checkpoint_tasks, run_loss_label
from data import DATASETS, DataOptions, get_dataset_spec
from data.files import truncated_paths, truncation_note
from data.fingerprint import split_fingerprint
from data.hierarchy_files import read_hierarchy
from data.validation import hold_out_validation
from engine import (SELECTION_RULES, HashingObjective, Loaders, NonFiniteLoss, Progress, Run, Trainer,
                    restore_training_state)
from engine import train as train_epochs
from hashing import codetable
from hashing.codes import NonFiniteCodes
from hashing.conventions import NORMALIZE, TIES, ZERO_HIT, Convention
from hashing.metrics import check_top_ns
from loss import (LOSSES, PROXY_LOSSES, CollaborativeExpertsLoss, HierarchicalProxyLoss, build_experts_loss,
                  build_loss)
from network import BACKBONES, build_network
from utils.atomic import ensure_writable_dir, remove_leftovers
from utils.checkpoint import imagenet_state_dict, read_train_state, require_checkpoint_file
from utils.device import select_device
from utils.dist import (DistContext, barrier, gather_objects, init_distributed, shard_bounds, shutdown,
                        state_fingerprint)
from utils.errors import TrainingInterrupted, UserError, run_reporting_errors
from utils.lock import run_lock
from utils.reproducibility import loader_generator, seed_everything, seed_worker
from utils.runlog import RunFiles, RunLog, setup_for_distributed, warn

# --optimizer: the network's and the proxies' optimiser; --momentum is SGD's (RMSprop's and Adam's are
# torch's defaults, as DeepHash-pytorch uses them).
OPTIMIZERS = {
    "sgd": lambda groups, args: torch.optim.SGD(groups, momentum=args.momentum, weight_decay=args.weight_decay),
    "rmsprop": lambda groups, args: torch.optim.RMSprop(groups, weight_decay=args.weight_decay),
    "adam": lambda groups, args: torch.optim.Adam(groups, weight_decay=args.weight_decay),
}
DEFAULT_VAL_SIZE = 500


# ============ command line ============

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


def inference_head(text):
    if text == "mean":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a head index (0, 1, ...) or 'mean', got {text!r}")


def finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text):
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def zeta_value(text):
    """ζ is a cosine between codes and must leave room below 1 (docs/METHOD.md §1)."""
    value = finite_float(text)
    if not -1 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [-1, 1), got {text!r}")
    return value


def seed_value(text):
    """numpy's and the DataLoader workers' seeds take 0 <= seed < 2**32."""
    value = non_negative_int(text)
    if value >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {text!r}")
    return value


def get_args_parser(add_help=True):
    """The command line, in groups; add_help=False lets other tools (benchmarks/compare.py) reuse it."""
    parser = argparse.ArgumentParser(
        description="HyP2 loss deep hashing: train a hash network and evaluate mAP@K by Hamming ranking.",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add_group in (add_data_arguments, add_model_arguments, add_loss_arguments, add_optimisation_arguments,
                      add_evaluation_arguments, add_output_arguments, add_device_arguments):
        add_group(parser)
    return parser


def add_data_arguments(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="voc2007", choices=list(DATASETS), help="dataset")
    group.add_argument("--data_root", default="./data", help="folder holding the datasets")
    group.add_argument("--subset", type=non_negative_int, default=0,
                       help="use only the first N images of each split (smoke tests); 0 = all")
    group.add_argument("--workers", type=int, default=-1,
                       help="DataLoader worker processes; -1 = 0 for in-memory datasets, else min(8, CPUs)")
    group.add_argument("--cache", action="store_true",
                       help="decode each image once, resized, into a uint8 memory-mapped file under the data root, "
                            "reused by later epochs and runs")
    group.add_argument("--imbalance", type=finite_float, default=1.0, metavar="RHO",
                       help="digits: long-tailed training set whose class frequencies decay exponentially from "
                            "the commonest to the rarest class, RHO times rarer; queries stay balanced; 1 = balanced")
    group.add_argument("--skip_bad_images", action="store_true",
                       help="check every image once before training and leave out missing or undecodable ones "
                            "(default: stop at the first, naming the file)")
    group.add_argument("--strict_images", action="store_true",
                       help="a truncated image is an error (default: it loads padded, as in the paper's code)")
    group.add_argument("--split", choices=["paper", "random"], default="paper",
                       help="flickr: the paper's fixed split (shipped) or a permutation drawn from --seed")


def add_model_arguments(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", default="googlenet", choices=list(BACKBONES), help="backbone network")
    group.add_argument("--hash_bit", type=positive_int, default=48, help="number of hash bits n")
    weights = group.add_mutually_exclusive_group()
    weights.add_argument("--weights", default=None, metavar="PATH",
                         help="the backbone's ImageNet weights (a torchvision state_dict file); default: torchvision's "
                              "file from the torch hub cache, downloaded if missing")
    weights.add_argument("--no_pretrained", action="store_true", help="train the backbone from scratch")
    group.add_argument("--experts", type=positive_int, default=1, metavar="E",
                       help="E >= 2 hash heads on the shared trunk, trained collaboratively (ECL); 1 = one head")
    group.add_argument("--inference_head", type=inference_head, default=0, metavar="HEAD",
                       help="with --experts: the head whose outputs give the codes, or 'mean' of the heads' "
                            "outputs before the sign")


def loss_flag(loss_name, hyperparameter):
    """The flag (without dashes) of a loss's Hyperparameter: its own flag, else {loss}_{name}."""
    return hyperparameter.flag or f"{loss_name}_{hyperparameter.name}"


def add_hyperparameter_flags(group, owner, loss_class):
    for hyperparameter in loss_class.HYPERPARAMETERS:
        kind = finite_float if isinstance(hyperparameter.default, float) else int
        group.add_argument(f"--{loss_flag(owner, hyperparameter)}", type=kind, default=hyperparameter.default,
                           help=f"{owner}: {hyperparameter.help}")


def add_loss_arguments(parser):
    """--loss and one flag per hyper-parameter of every loss (published defaults), ζ, and the hierarchy."""
    group = parser.add_argument_group("loss (each loss's flags are used only by that loss)")
    group.add_argument("--loss", default="hyp2", choices=list(LOSSES), help="training loss")
    group.add_argument("--zeta", type=zeta_value, default=None, help="override the threshold zeta of the code table")
    group.add_argument("--codetable", default=None, metavar="XLSX",
                       help="read zeta from the paper's codetable.xlsx (cross-check with the built-in table)")
    for name, loss_class in LOSSES.items():
        add_hyperparameter_flags(group, name, loss_class)
    group = parser.add_argument_group("hierarchical proxies (HPL) on top of " + ", ".join(PROXY_LOSSES))
    group.add_argument("--hierarchy", type=non_negative_int, default=0, metavar="K",
                       help="number of coarse clusters of the class proxies; 0 = no hierarchy")
    group.add_argument("--hierarchy_file", default=None, metavar="CSV",
                       help="a given class hierarchy (class,level1[,level2...]), or a shipped one: voc, coco, digits")
    add_hyperparameter_flags(group, "hierarchy", HierarchicalProxyLoss)
    group = parser.add_argument_group("collaborative experts (ECL) with --experts E >= 2; weights 0 = off")
    add_hyperparameter_flags(group, "ecl", CollaborativeExpertsLoss)


def add_optimisation_arguments(parser):
    group = parser.add_argument_group("optimisation")
    group.add_argument("--batch_size", type=positive_int, default=100, help="mini-batch size")
    group.add_argument("--epochs", type=positive_int, default=100, help="training epochs")
    group.add_argument("--lr", type=non_negative_float, default=0,
                       help="network learning rate; 0 = the backbone's default")
    group.add_argument("--rate", type=non_negative_float, default=0.02, help="learning rate of the proxies")
    group.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                       help="optimiser of the network and the proxies: the paper's SGD, or RMSprop / Adam (torch's "
                            "defaults besides --lr and --weight_decay) as other losses' papers use")
    group.add_argument("--momentum", type=non_negative_float, default=0.9,
                       help="SGD momentum (the paper's 0.9; --optimizer sgd only)")
    group.add_argument("--weight_decay", type=non_negative_float, default=5e-4,
                       help="weight decay of every optimiser (the paper's 5e-4)")
    group.add_argument("--lr_step", type=positive_int, default=10,
                       help="multiply the learning rates by --lr_gamma every N epochs (the paper's 10)")
    group.add_argument("--lr_gamma", type=non_negative_float, default=0.5,
                       help="learning-rate decay factor of each --lr_step (the paper's 0.5)")
    group.add_argument("--seed", type=seed_value, default=0,
                       help="random seed (data split, init, batches), 0 to 2**32-1")
    group.add_argument("--amp", nargs="?", const="auto", choices=["auto", "bf16", "fp16"], default=None,
                       help="mixed precision on CUDA (bf16 if supported, else fp16 with loss scaling); "
                            "ignored on the CPU")
    group.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                       help="continue an interrupted run from its training state (default "
                            "OUTPUT_DIR/{run}.last.pt, written after every epoch)")


def add_evaluation_arguments(parser):
    group = parser.add_argument_group("evaluation")
    group.add_argument("--retrieve", "--topk", dest="retrieve", type=non_negative_int, default=0,
                       help="K of mAP@K; 0 = the dataset's default (--topk is the same flag, DeepHash-pytorch's name)")
    group.add_argument("--map_normalize", choices=NORMALIZE, default="hits",
                       help="what AP@K divides by: the hits in the top K (the paper's), min(R, K) or R, all relevant "
                            "items (docs/METHOD.md §3.5)")
    group.add_argument("--zero_hit", choices=ZERO_HIT, default="zero",
                       help="a query whose AP denominator is 0 scores 0 (the paper's) or is left out of the mean")
    group.add_argument("--ties", choices=TIES, default="index",
                       help="order of items at equal Hamming distance: database index (the paper's), aware = exact "
                            "expectation over all orders, random = one shuffle seeded by --seed")
    group.add_argument("--eval_every", type=positive_int, default=5, help="evaluate every N epochs (and at the end)")
    group.add_argument("--select", default="test", choices=SELECTION_RULES,
                       help="which evaluated epoch's checkpoint is kept: test = best mAP on the test queries (the "
                            "paper's rule), val = best mAP on a validation split held out from the training set, "
                            "then evaluated once on the test queries, last = the last epoch")
    group.add_argument("--val_size", type=positive_int, default=None,
                       help=f"--select val: training items held out (seeded) as validation queries "
                            f"(default {DEFAULT_VAL_SIZE})")
    group.add_argument("--test", action="store_true", help="evaluate the saved checkpoint instead of training")
    group.add_argument("--top_n", type=positive_int, nargs="+", default=None, metavar="N",
                       help="N of precision@top-N (default: 100, 200, ..., 1000, or ten steps up to a smaller database)")
    group.add_argument("--plots", action="store_true",
                       help="draw the figures (top-N, PR, convergence, t-SNE) as OUTPUT_DIR/{run}.*.png")
    group.add_argument("--plot_format", choices=["png", "pdf", "svg"], default="png",
                       help="file format of the --plots figures")
    group.add_argument("--query", nargs="+", default=None, metavar="IMAGE",
                       help="search the database with these images using the saved checkpoint; DATASET:N is the "
                            "N-th image of the query split (e.g. digits:0)")
    group.add_argument("--num_matches", type=positive_int, default=10, help="matches printed per --query image")
    group.add_argument("--export_index", default=None, metavar="PATH",
                       help="write the database codes as a FAISS IndexBinaryFlat to PATH")


def add_output_arguments(parser):
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", default="./result", help="folder for checkpoints and logs")
    group.add_argument("--checkpoint", default=None,
                       help="checkpoint to write/test (default: OUTPUT_DIR/{dataset}_{backbone}_{hash_bit}[_{loss}].ckpt)")
    group.add_argument("--no_save", action="store_true", help="write no checkpoint or log")
    group.add_argument("--overwrite", action="store_true",
                       help="start a new training even though OUTPUT_DIR holds this run's checkpoint or training "
                            "state (replaced as the new run writes its own); without it such a run stops and "
                            "suggests --resume")
    group.add_argument("--no_progress", action="store_true",
                       help="no progress bars (they are off anyway when stderr is not a terminal)")


def add_device_arguments(parser):
    group = parser.add_argument_group("device and distributed (launch with torchrun for several processes)")
    group.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    group.add_argument("--cuda", type=non_negative_int, default=0, help="GPU id when running on CUDA")


def check_flags(args):
    """Combinations of flags that cannot work, refused before any work is done."""
    if args.plots and args.no_save:
        raise UserError("--plots writes figures and --no_save writes nothing: drop one of them")
    if args.val_size is not None and args.select != "val":
        raise UserError(f"--val_size is used by --select val only (this run has --select {args.select}): "
                        "drop it or add --select val")
    if args.split != "paper" and args.dataset != "flickr":
        raise UserError(f"--split {args.split} applies to --dataset flickr only; --dataset {args.dataset} has one "
                        "protocol (see README, Datasets)")
    if args.hierarchy and args.hierarchy_file:
        raise UserError("--hierarchy K clusters the proxies and --hierarchy_file gives the groups: use one of them")
    if args.inference_head != 0 and args.experts == 1:
        raise UserError(f"--inference_head {args.inference_head} needs --experts E >= 2 (one head has nothing to "
                        "choose from)")
    if args.inference_head not in ("mean", 0) and args.inference_head >= args.experts:
        raise UserError(f"--inference_head {args.inference_head}: the heads are 0 to {args.experts - 1}, or mean")


def output_and_input_paths(args, files):
    """([(what, path) written], [(what, path) read]) by this invocation."""
    written = [("--export_index", args.export_index)] if args.export_index else []
    if not args.no_save:
        written += [("the codes cache", files.codes), ("the metrics file", files.metrics)]
        if not uses_checkpoint(args):
            written += [("--checkpoint", files.checkpoint), ("the training state", files.last),
                        ("the text log", files.text_log), ("the event log", files.event_log)]
    read = [("--weights", args.weights), ("--codetable", args.codetable), ("--resume", args.resume or None)]
    read += [("--query", path) for path in args.query or []]
    if uses_checkpoint(args):
        read.append(("--checkpoint", files.checkpoint))
    return written, [(what, path) for what, path in read if path]


def check_paths(args, files):
    """No invocation writes a file it reads, or one file twice (--export_index onto the checkpoint once
    replaced it with an 81-byte index)."""
    written, read = output_and_input_paths(args, files)
    seen = {}
    for what, path in read + written:
        resolved = Path(path).resolve()
        if resolved in seen and (what, path) in written:
            raise UserError(f"{what} {path} is also {seen[resolved]}: writing it would destroy that file; "
                            "choose another path")
        seen.setdefault(resolved, what)


def remove_interrupted_writes(files):
    """The hidden temporary files a killed run left next to this run's files (under the run lock)."""
    removed = sum(remove_leftovers(path) for path in (files.checkpoint, files.last, files.codes, files.metrics))
    if removed:
        print(f"note: removed {removed} temporary file(s) of an interrupted write next to {files.checkpoint}",
              file=sys.stderr)


def refuse_to_replace_a_run(args, files):
    """A new training (no --resume) into a run's files stops, unless --overwrite: then the new run replaces
    them file by file as it writes its own (atomically, so a failing new run leaves the old files whole)."""
    if uses_checkpoint(args) or args.no_save:
        return
    if files.checkpoint.is_dir():
        raise UserError(f"--checkpoint {files.checkpoint} is a folder; pass a file path for the checkpoint")
    if args.resume is not None:
        return
    existing = [path for path in (files.checkpoint, files.last) if path.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} holds an earlier run: continue it with --resume, keep it by choosing "
                        "another --output_dir, or start afresh with --overwrite")


def uses_checkpoint(args):
    """--test, --query and --export_index work with the saved checkpoint instead of training."""
    return bool(args.test or args.query or args.export_index)


# ============ building the parts ============

def data_options(args):
    return DataOptions(cache=args.cache, skip_bad_images=args.skip_bad_images, strict_images=args.strict_images,
                       split=args.split, imbalance=args.imbalance)


def build_splits(spec, args, input_size):
    if args.imbalance != 1 and "imbalance" not in spec.options:
        raise UserError(f"--imbalance: --dataset {args.dataset} has no long-tailed variant (only "
                        f"{', '.join(name for name, other in DATASETS.items() if 'imbalance' in other.options)})")
    try:
        splits = spec.build(Path(args.data_root), args.seed, input_size, data_options(args))
    except NotImplementedError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        if args.imbalance == 1:
            raise
        raise UserError(str(exc)) from None
    if args.subset:
        splits = type(splits)(*(Subset(part, range(min(args.subset, len(part)))) for part in splits))
    for name, part in splits._asdict().items():
        if len(part) == 0:
            raise UserError(f"the {name} split of --dataset {args.dataset} is empty; check the data under "
                            f"--data_root {args.data_root} (see README, Datasets)")
    return splits


def retrieval_depth(args, spec, database_size):
    """K of mAP@K: --retrieve, else the dataset's default, else the whole database; clamped to it."""
    topk = args.retrieve or spec.default_topk or database_size
    if topk > database_size:
        if args.retrieve:
            warn(f"--retrieve {args.retrieve} exceeds the database ({database_size} items); using K = {database_size}")
        topk = database_size
    return topk


def train_batch_size(args, train_size, world_size):
    """Each process's share of --batch_size; UserError when it would be a single sample (BatchNorm needs 2)."""
    batch_size = max(1, args.batch_size // world_size)
    if uses_checkpoint(args):  # no training: the train loader is not used
        return batch_size
    if batch_size < 2 or train_size < 2 * world_size:
        raise UserError(f"training needs at least 2 images per batch and process (BatchNorm), but --batch_size "
                        f"{args.batch_size} over {world_size} process(es) and a train split of {train_size} give "
                        f"{min(batch_size, train_size // world_size)}; raise --batch_size or add training images")
    return batch_size


def make_loaders(splits, args, spec, device, context=DistContext()):
    """Train loader (each rank a 1/world share of every global batch) and per-rank eval shards.

    Every loader has its own generator, so evaluation never draws from the global RNG, and shuffling and
    worker seeds are functions of (--seed, epoch) (engine.set_epoch), so a resumed run replays the batches.
    """
    workers = args.workers if args.workers >= 0 else (0 if spec.in_memory else min(8, os.cpu_count() or 1))
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker)
    sampler = DistributedSampler(splits.train, num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=args.seed)
    # Training workers start afresh every epoch, seeded from the generator engine.set_epoch reseeds: persistent
    # workers would carry their random state over from epoch to epoch, which a resumed run cannot replay.
    batch_size = train_batch_size(args, len(splits.train), context.world_size)
    per_rank = math.ceil(len(splits.train) / context.world_size)
    # BatchNorm cannot train on a batch of one, so a last batch of one sample is left out (drop_last).
    train = DataLoader(splits.train, batch_size=batch_size, sampler=sampler, drop_last=per_rank % batch_size == 1,
                       generator=loader_generator(args.seed), **common)
    common["persistent_workers"] = workers > 0  # evaluation draws no random numbers

    def eval_loader(dataset):
        start, stop = shard_bounds(len(dataset), args.batch_size, context)
        shard = dataset if (start, stop) == (0, len(dataset)) else Subset(dataset, range(start, stop))
        return DataLoader(shard, batch_size=args.batch_size, shuffle=False,
                          generator=loader_generator(args.seed), **common)

    return Loaders(train, eval_loader(splits.query), eval_loader(splits.database))


def validation_size(args):
    """--val_size, or its default (the flag defaults to None so that check_flags can tell it was given)."""
    return args.val_size or DEFAULT_VAL_SIZE


def validation_splits(splits, args):
    """--select val: (the splits with the training split reduced, the validation splits), else (splits, None)."""
    if args.select != "val" or uses_checkpoint(args):  # a saved checkpoint is evaluated on the test queries
        return splits, None
    try:
        validation = hold_out_validation(splits, validation_size(args), args.seed)
    except ValueError as exc:
        raise UserError(f"--val_size: {exc} in --dataset {args.dataset}; lower --val_size") from None
    return splits._replace(train=validation.train), validation


def run_files(args):
    """Where this run's files go: OUTPUT_DIR/{dataset}_{backbone}_{hash_bit}[_{loss}].*"""
    return RunFiles.for_run(args.output_dir, dataset_label(args), args.backbone, args.hash_bit,
                            run_loss_label(args), args.checkpoint)


def prepare_run(args, device, context, input_size):
    """The data, K, loaders and output files of this invocation: the Run every stage reads."""
    spec = get_dataset_spec(args.dataset)
    splits = build_splits(spec, args, input_size)
    spec = spec.with_classes_of(splits)
    splits, validation = validation_splits(splits, args)
    if args.top_n:  # checked before training, not after it
        try:
            check_top_ns(args.top_n, len(splits.database))
        except ValueError as exc:
            raise UserError(f"--top_n: {exc}") from None
    files = run_files(args)
    log = RunLog(files, enabled=context.is_main and not args.no_save and not uses_checkpoint(args))
    run = Run(args=args, device=device, context=context, spec=spec, splits=splits,
              loaders=make_loaders(splits, args, spec, device, context),
              topk=retrieval_depth(args, spec, len(splits.database)), files=files, log=log, input_size=input_size,
              convention=Convention(args.map_normalize, args.zero_hit, args.ties, args.seed))
    if validation is not None:
        run.validation = make_loaders(validation, args, spec, device, context)
        run.validation_topk = min(run.topk, len(validation.database))
    return run


def make_network(args, backbone):
    """The hash network, starting from ImageNet weights when training (--test loads a whole checkpoint)."""
    if args.weights and not backbone.pretrained_available:
        raise UserError(f"--weights: the {args.backbone} backbone has no ImageNet weights to load")
    heads = dict(experts=args.experts, inference_head=args.inference_head)
    if not backbone.pretrained_available or args.no_pretrained or uses_checkpoint(args):
        return build_network(args.backbone, args.hash_bit, **heads)
    state, source = imagenet_state_dict(backbone.imagenet_weights, args.backbone, args.weights,
                                        show_progress=not args.no_progress)
    print(f"{args.backbone}: ImageNet weights from {source}")
    try:
        return build_network(args.backbone, args.hash_bit, pretrained=state, **heads)
    except ValueError as exc:
        raise UserError(f"cannot use {source} for --backbone {args.backbone}: {exc}") from None


def make_network_on_every_rank(args, backbone, context, device):
    """make_network on rank 0 first, so that ranks do not download the same ImageNet weights at once."""
    if context.is_main:
        network = make_network(args, backbone)
    barrier(context)
    if not context.is_main:
        network = make_network(args, backbone)
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if device.type == "cuda" else network


def hyperparameter_values(args, owner, loss_class):
    return {h.name: getattr(args, loss_flag(owner, h)) for h in loss_class.HYPERPARAMETERS}


def given_hierarchy(args, spec):
    """The coarse levels of --hierarchy_file, read for this dataset (None without the flag)."""
    if not args.hierarchy_file:
        return None
    try:
        return read_hierarchy(args.hierarchy_file, spec.num_classes, spec.class_names).levels
    except ValueError as exc:
        raise UserError(f"--hierarchy_file: {exc}") from None


def build_criterion(args, spec):
    """The loss of --loss with its flags, wrapped in hierarchical proxies with --hierarchy K > 0 or
    --hierarchy_file, and in collaborative experts with --experts E >= 2 (one such loss per head)."""
    loss_class, zeta = LOSSES[args.loss], None
    if loss_class.uses_zeta:
        try:
            zeta, disagreement = codetable.resolve_zeta(args.hash_bit, spec.num_classes, args.zeta, args.codetable)
        except ValueError as exc:
            flag = f"--codetable {args.codetable}" if args.codetable and args.zeta is None else f"--hash_bit {args.hash_bit}"
            raise UserError(f"{flag}: {exc}; or pass --zeta VALUE") from None
        if disagreement:
            warn(disagreement)
    hierarchy = given_hierarchy(args, spec) or args.hierarchy

    def build_head():
        return build_loss(args.loss, spec.num_classes, args.hash_bit, zeta=zeta, seed=args.seed, hierarchy=hierarchy,
                          hierarchy_settings=hyperparameter_values(args, "hierarchy", HierarchicalProxyLoss),
                          **hyperparameter_values(args, args.loss, loss_class))
    try:
        if args.experts == 1:
            return build_head()
        return build_experts_loss(args.experts, build_head,
                                  **hyperparameter_values(args, "ecl", CollaborativeExpertsLoss))
    except ValueError as exc:
        flag = ("--experts" if args.experts > 1 else "--hierarchy_file" if args.hierarchy_file
                else "--hierarchy" if args.hierarchy else "--loss")
        raise UserError(f"{flag} {getattr(args, flag[2:])}: {exc}") from None


def build_trainer(args, objective, lr, device):
    """--optimizer (SGD by default) over the network and (at --rate) the loss's learnable state (--momentum,
    --weight_decay), StepLR (--lr_step, --lr_gamma), and --amp's autocast dtype and gradient scaler (both off
    on the CPU, where they do not help)."""
    param_groups = [{"params": objective.network.parameters(), "lr": lr}]
    loss_parameters = list(objective.criterion.parameters())
    if loss_parameters:  # SGD rejects an empty group, and losses with fixed targets have no parameters
        param_groups.append({"params": loss_parameters, "lr": args.rate})
    optimizer = OPTIMIZERS[args.optimizer](param_groups, args)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)
    amp_dtype = None
    if args.amp is not None and device.type == "cuda":
        amp = args.amp if args.amp != "auto" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Trainer(objective, objective, optimizer, scheduler, scaler, amp_dtype)


# ============ training ============

def describe_training(run, trainer, lr):
    """The header line and the record that start the run's logs."""
    args, context, criterion = run.args, run.context, trainer.objective.criterion
    settings = criterion.hyperparameters()
    label = run_loss_label(args)
    sizes = {name: len(part) for name, part in run.splits._asdict().items()}
    if run.validation is not None:
        sizes["validation"] = len(run.validation.query.dataset)
    described = ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                          for name, value in settings.items())
    header = (f"{dataset_label(args)} / {args.backbone} / {args.hash_bit} bits: {sizes}, loss {label} ({described}), "
              f"lr {lr:g}{f' (proxies {args.rate:g})' if list(criterion.parameters()) else ''}, device {run.device}"
              + (f" x {context.world_size} processes" if context.enabled else "")
              + f", {args.optimizer}, select {describe_selection(run)}")
    data_files = run.spec.describe(Path(args.data_root), data_options(args)) if run.spec.describe else {}
    if data_files:
        header += "\ndata files: " + "; ".join(f"{name} {value}" for name, value in data_files.items())
    record = {"args": vars(args), "num_classes": run.spec.num_classes, "topk": run.topk, "data_files": data_files,
              "convention": run.convention.as_dict(),
              "zeta": settings.get("zeta"), "device": str(run.device), "world_size": context.world_size,
              "amp": str(trainer.amp_dtype), "loss": {"name": label, **settings}, "sizes": sizes}
    return header, record


def describe_selection(run):
    """The --select rule in words, for the run's header line."""
    if run.select == "val":
        return (f"val (best val mAP@{run.validation_topk} of {len(run.validation.query.dataset)} held-out "
                "training items)")
    return {"test": "test (best mAP on the test queries, the paper's rule)",
            "last": "last (the last epoch)"}[run.select]


def data_identity(run):
    """What a training state records of its data and files, checked on --resume: the dataset, its root,
    the class count, a digest of each split's labels and image list, and the checkpoint path."""
    args = run.args
    return {"checkpoint": str(run.files.checkpoint.resolve()), "dataset": args.dataset,
            "data_root": str(Path(args.data_root).resolve()), "classes": run.spec.num_classes,
            **{f"{name} split": split_fingerprint(part, file_status=False)
               for name, part in run.splits._asdict().items()}}


def resume(run, trainer):
    """Restore what engine.train saved in .last.pt; returns the Progress to continue from."""
    args = run.args
    state, changed = read_train_state(args.resume or run.files.last, vars(args), run.data_identity)
    for change in changed:
        warn(f"resuming with {change}; the result will differ from an uninterrupted run")
    return restore_training_state(trainer, state, run.device)


def divergence_hint(args, exc, lr):
    """What to change when training diverged: the loss's flags when the loss was not finite before the
    first optimiser step (no learning rate was used yet), else the learning rates."""
    if getattr(exc, "before_any_step", False):
        flags = [f"--{loss_flag(args.loss, h)} {getattr(args, loss_flag(args.loss, h))}"
                 for h in LOSSES[args.loss].HYPERPARAMETERS]
        if args.zeta is not None:
            flags.append(f"--zeta {args.zeta}")
        return (f"the loss is not finite before any update, so check the settings of --loss {args.loss}"
                + (f" ({', '.join(flags)})" if flags else ""))
    return f"lower --lr (now {lr:g}) or --rate (now {args.rate:g})"


def train_reporting_failures(run, trainer, progress, lr):
    """engine.train, with a one-line message that says what to do when the loss diverges or on Ctrl-C."""
    args = run.args
    try:
        return train_epochs(run, trainer, progress)
    except (NonFiniteLoss, NonFiniteCodes) as exc:
        best = (f"the best checkpoint {run.files.checkpoint} (epoch {progress.best_epoch}, mAP "
                f"{progress.best_map:.4f}, finite) is kept" if progress.best_epoch else "no checkpoint was saved")
        raise UserError(f"{exc}: {divergence_hint(args, exc, lr)}; {best}") from None
    except KeyboardInterrupt:
        if progress.epoch and not args.no_save:
            raise TrainingInterrupted(f"interrupted; the state after epoch {progress.epoch} is in {run.files.last}: "
                                      "rerun the same command with --resume to continue") from None
        raise TrainingInterrupted("interrupted before the first epoch finished; nothing to resume") from None


def train(run, network, default_lr):
    args, context = run.args, run.context
    # ============ loss, optimiser and mixed precision ============
    criterion = build_criterion(args, run.spec)
    objective = HashingObjective(network, criterion).to(run.device)
    lr = args.lr or default_lr
    trainer = build_trainer(args, objective, lr, run.device)
    run.data_identity = data_identity(run)
    if run.writes_files:
        ensure_writable_dir(args.output_dir)
        ensure_writable_dir(run.files.checkpoint.parent, "--checkpoint")
    # ============ optionally resume, then start the logs ============
    progress = resume(run, trainer) if args.resume is not None else Progress()
    header, record = describe_training(run, trainer, lr)
    run.log.start(record, resumed_after=progress.epoch if args.resume is not None else None,
                  best={"map": progress.best_map, "epoch": progress.best_epoch} if progress.best_epoch else None)
    if args.resume is not None:
        run.log.say(f"resumed after epoch {progress.epoch} "
                    f"(kept {run.selection_score_name} {progress.best_map:.4f} at epoch {progress.best_epoch})")
    run.log.say(header)
    # ============ distributed: the objective (network and loss together) under DDP ============
    if context.enabled:
        trainer.model = DistributedDataParallel(objective, device_ids=[run.device.index]
                                                if run.device.type == "cuda" else None)
    # ============ the epochs, then the best checkpoint's report ============
    selected = train_reporting_failures(run, trainer, progress, lr)
    fingerprints = gather_objects(context, state_fingerprint(objective))
    if context.enabled and len(set(fingerprints)) > 1:
        warn("the ranks ended with different models")
    selection = {"select": run.select, "epoch": selected.epoch,
                 **({"val_map": progress.best_map} if run.select == "val" else {})}
    metrics = None
    if progress.best_epoch and not args.no_save:
        metrics = report_best_checkpoint(run, network, selected.codes, selection)
    tail = metrics and metrics["long_tail"]["buckets"]["tail"]["map"]
    val = f", {run.selection_score_name} {progress.best_map:.4f}" if run.select == "val" else ""
    best = "best " if run.select == "test" else ""
    tail_note = f", tail classes {tail:.4f}" if tail is not None else ""
    summary = (f"{best}{run.map_name} {selected.map:.4f} at epoch {selected.epoch} (select {run.select}{val}"
               f"{tail_note}); "
               f"checkpoint {'not saved (--no_save)' if args.no_save else run.files.checkpoint}; "
               f"training {progress.train_seconds:.1f}s")
    run.log.say(summary)
    truncated = report_truncated_images(run)
    run.log.event("finish", best={"map": progress.best_map, "epoch": progress.best_epoch}, test_map=selected.map,
                  selection=selection, train_seconds=progress.train_seconds, truncated_images=truncated,
                  **({"rank_fingerprints": fingerprints} if context.enabled else {}))
    return {"map": selected.map, "epoch": selected.epoch, "topk": run.topk, "selection": selection,
            "train_seconds": progress.train_seconds, "long_tail": metrics and metrics["long_tail"]}


def report_truncated_images(run):
    """Print how many distinct truncated images this run's decoding padded (over all ranks); returns it."""
    found = set().union(*gather_objects(run.context, truncated_paths(run.splits)))
    note = truncation_note(len(found))
    if note:
        run.log.say(note)
    return len(found)


# ============ main ============

def run_command(args, device, context):
    # ============ data, K and output files ============
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    backbone = BACKBONES[args.backbone]
    run = prepare_run(args, device, context, backbone.input_size)
    # ============ the hash network ============
    network = make_network_on_every_rank(args, backbone, context, device)
    # ============ a saved checkpoint's tasks, or training ============
    if uses_checkpoint(args):
        result = run_checkpoint_tasks(run, network)
        report_truncated_images(run)
        return result
    return train(run, network, backbone.default_lr)


def main(args):
    check_flags(args)
    files = run_files(args)
    check_paths(args, files)
    if uses_checkpoint(args):
        require_checkpoint_file(files.checkpoint)
    device = select_device(args.device, args.cuda)
    context = init_distributed(device.type)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    setup_for_distributed(context.is_main, progress=not args.no_progress)
    try:
        writes = context.is_main and not args.no_save
        if writes:
            ensure_writable_dir(args.output_dir)
        with run_lock(files.with_suffix(".lock"), enabled=writes):
            if writes:
                remove_interrupted_writes(files)
            if context.is_main:
                refuse_to_replace_a_run(args, files)
            return run_command(args, device, context)
    finally:
        shutdown(context)


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    run_reporting_errors(lambda: main(args))


if __name__ == "__main__":
    cli()
