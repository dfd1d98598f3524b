"""The parts of a run, built from the flags: the data splits and their loaders, K, the hash network
(with its ImageNet weights), the loss and the optimiser. retrieval.py calls these in order; each takes the
Run (or the flags) and returns a part, so a harness or a test can build one part alone.
"""
import dataclasses
import math
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from data import DATASETS, DataOptions, get_dataset_spec
from data.hierarchy_files import read_hierarchy
from data.validation import hold_out_validation
from engine import Loaders, Trainer
from hashing import codetable
from hashing.conventions import Convention
from hashing.metrics import check_top_ns
from loss import LOSSES, CollaborativeExpertsLoss, HierarchicalProxyLoss, build_experts_loss, build_loss
from network import build_network
from utils.checkpoint import imagenet_state_dict
from utils.dist import barrier, shard_bounds
from utils.errors import UserError
from utils.reproducibility import loader_generator, seed_worker
from utils.runlog import RunLog, warn

# --optimizer: the network's and the proxies' optimiser; --momentum is SGD's (RMSprop's and Adam's are
# torch's defaults, as DeepHash-pytorch uses them).
OPTIMIZERS = {
    "sgd": lambda groups, args: torch.optim.SGD(groups, momentum=args.momentum, weight_decay=args.weight_decay),
    "rmsprop": lambda groups, args: torch.optim.RMSprop(groups, weight_decay=args.weight_decay),
    "adam": lambda groups, args: torch.optim.Adam(groups, weight_decay=args.weight_decay),
}
DEFAULT_VAL_SIZE = 500


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


def train_batch_size(run, train_size):
    """Each process's share of --batch_size; UserError when it would be a single sample (BatchNorm needs 2)."""
    args, world_size = run.args, run.context.world_size
    batch_size = max(1, args.batch_size // world_size)
    if not run.trains:  # the train loader is not used
        return batch_size
    if batch_size < 2 or train_size < 2 * world_size:
        raise UserError(f"training needs at least 2 images per batch and process (BatchNorm), but --batch_size "
                        f"{args.batch_size} over {world_size} process(es) and a train split of {train_size} give "
                        f"{min(batch_size, train_size // world_size)}; raise --batch_size or add training images")
    return batch_size


def make_loaders(run, splits):
    """Train loader (each rank a 1/world share of every global batch) and per-rank eval shards.

    Every loader has its own generator, so evaluation never draws from the global RNG, and shuffling and
    worker seeds are functions of (--seed, epoch) (engine.set_epoch), so a resumed run replays the batches.
    """
    args, device, context = run.args, run.device, run.context
    workers = args.workers if args.workers >= 0 else (0 if run.spec.in_memory else min(8, os.cpu_count() or 1))
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker)
    sampler = DistributedSampler(splits.train, num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=args.seed)
    # Training workers start afresh every epoch, seeded from the generator engine.set_epoch reseeds: persistent
    # workers would carry their random state over from epoch to epoch, which a resumed run cannot replay.
    batch_size = train_batch_size(run, len(splits.train))
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


def validation_splits(run, splits):
    """--select val: (the splits with the training split reduced, the validation splits), else (splits, None)."""
    args = run.args
    if args.select != "val" or not run.trains:  # a saved checkpoint is evaluated on the test queries
        return splits, None
    try:
        validation = hold_out_validation(splits, validation_size(args), args.seed)
    except ValueError as exc:
        raise UserError(f"--val_size: {exc} in --dataset {args.dataset}; lower --val_size") from None
    return splits._replace(train=validation.train), validation


def prepare_run(run, input_size):
    """The Run with its data, K, loaders and log: what every later stage reads."""
    args = run.args
    spec = get_dataset_spec(args.dataset)
    splits = build_splits(spec, args, input_size)
    run = dataclasses.replace(run, spec=spec.with_classes_of(splits), input_size=input_size)
    splits, validation = validation_splits(run, splits)
    if args.top_n:  # checked before training, not after it
        try:
            check_top_ns(args.top_n, len(splits.database))
        except ValueError as exc:
            raise UserError(f"--top_n: {exc}") from None
    topk = retrieval_depth(args, run.spec, len(splits.database))
    run = dataclasses.replace(
        run, splits=splits, loaders=make_loaders(run, splits), topk=topk, log=RunLog(run.files, enabled=run.logs),
        convention=Convention(args.map_normalize, args.zero_hit, args.ties, args.seed))
    if validation is None:
        return run
    return dataclasses.replace(run, validation=make_loaders(run, validation),
                               validation_topk=min(topk, len(validation.database)))


def make_network(run, backbone):
    """The hash network, starting from ImageNet weights when training (--test loads a whole checkpoint)."""
    args = run.args
    if args.weights and not backbone.pretrained_available:
        raise UserError(f"--weights: the {args.backbone} backbone has no ImageNet weights to load")
    heads = dict(experts=args.experts, inference_head=args.inference_head)
    if not backbone.pretrained_available or args.no_pretrained or not run.trains:
        return build_network(args.backbone, args.hash_bit, **heads)
    state, source = imagenet_state_dict(backbone.imagenet_weights, args.backbone, args.weights,
                                        show_progress=not args.no_progress)
    print(f"{args.backbone}: ImageNet weights from {source}")
    try:
        return build_network(args.backbone, args.hash_bit, pretrained=state, **heads)
    except ValueError as exc:
        raise UserError(f"cannot use {source} for --backbone {args.backbone}: {exc}") from None


def make_network_on_every_rank(run, backbone):
    """make_network on rank 0 first, so that ranks do not download the same ImageNet weights at once."""
    context, device = run.context, run.device
    if context.is_main:
        network = make_network(run, backbone)
    barrier(context)
    if not context.is_main:
        network = make_network(run, backbone)
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if device.type == "cuda" else network


def hyperparameter_values(args, owner, loss_class):
    return {h.name: getattr(args, h.dest(owner)) for h in loss_class.HYPERPARAMETERS}


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
            from_workbook = args.codetable and args.zeta is None
            flag = f"--codetable {args.codetable}" if from_workbook else f"--hash_bit {args.hash_bit}"
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
