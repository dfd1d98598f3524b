"""The parts of a run, built from the flags: the data splits and their loaders, K, the hash network
(with its ImageNet weights), the loss and the optimiser. retrieval.py calls these in order; each takes the
Run (or the flags) and returns a part, so a harness or a test can build one part alone.
"""
import argparse
import dataclasses
import math
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from data import DATASETS, DataOptions, get_dataset_spec
from data.base import WithIndices
from data.registry import build_splits as data_splits
from data.unseen import ClassSplit, apply_class_split, resolve_unseen_classes
from data.hierarchy_files import read_hierarchy
from data.validation import hold_out_validation
from engine import Loaders, Trainer
from hashing import codetable
from hashing.search.api import resolve_network
from hashing.evaluation.conventions import Convention
from hashing.evaluation.metrics import check_top_ns
from loss import (LOSSES, CollaborativeExpertsLoss, HierarchicalProxyLoss, build_experts_loss, build_loss,
                  build_nested_loss)
from network import DEFAULT_BACKBONE, build_network, get_backbone, hash_head, trunk_and_head_parameters
from utils.dist import barrier, shard_bounds
from utils.checkpoint import describe_mismatch, read_state_dict
from utils.errors import UserError
from utils.reproducibility import loader_generator, seed_worker
from utils.runlog import RunLog, read_run_log, warn
from utils.weights import pretrained_state_dict

# --optimizer: the network's and the proxies' optimiser; --momentum is SGD's (RMSprop's and Adam's are
# torch's defaults, as DeepHash-pytorch uses them; AdamW's too, as the transformer recipes in configs/ use it).
OPTIMIZERS = {
    "sgd": lambda groups, args: torch.optim.SGD(groups, momentum=args.momentum, weight_decay=args.weight_decay),
    "rmsprop": lambda groups, args: torch.optim.RMSprop(groups, weight_decay=args.weight_decay),
    "adam": lambda groups, args: torch.optim.Adam(groups, weight_decay=args.weight_decay),
    "adamw": lambda groups, args: torch.optim.AdamW(groups, weight_decay=args.weight_decay),
}
DEFAULT_VAL_SIZE = 500


def data_options(args):
    return DataOptions.from_flags(vars(args))


def described_data_files(run):
    """What the run log and .metrics.json record of the data files in use (DatasetSpec.describe), e.g. coco's
    --split_variant; {} for a dataset without such files."""
    spec, args = run.spec, run.args
    return spec.describe(Path(args.data_root), data_options(args)) if spec.describe else {}


def build_splits(spec, args, preprocessing):
    if args.imbalance != 1 and "imbalance" not in spec.options:
        raise UserError(f"--imbalance: --dataset {args.dataset} has no long-tailed variant (only "
                        f"{', '.join(name for name, other in DATASETS.items() if 'imbalance' in other.options)})")
    try:
        return data_splits(spec.name, args.data_root, args.seed, preprocessing, data_options(args), args.subset)
    except NotImplementedError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        if args.imbalance == 1:
            raise
        raise UserError(str(exc)) from None


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
    # Each item carries its index, for a loss with a memory of the training items (--dpsh_memory, --dhn_memory).
    train = DataLoader(WithIndices(splits.train), batch_size=batch_size, sampler=sampler,
                       drop_last=per_rank % batch_size == 1, generator=loader_generator(args.seed), **common)
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


def recorded_class_split(run):
    """The seen and unseen classes the run's training log records (None when it has none or no log)."""
    try:
        record = read_run_log(run.files.event_log).get("class_split")
    except (OSError, UserError):
        return None
    if record is None:
        return None
    try:
        return ClassSplit.from_record(record, run.spec.num_classes)
    except ValueError as exc:
        raise UserError(f"{run.files.event_log}: {exc}; give --unseen_classes as the run was trained") from None


def class_split_of(run):
    """--unseen_classes resolved for the dataset; without the flag, --test, --query and --export_index take the
    classes the run was trained without from its log. None: every class is seen."""
    args, spec = run.args, run.spec
    if args.unseen_classes:
        return resolve_unseen_classes(args.unseen_classes, spec.num_classes, spec.class_names, args.seed)
    return None if run.trains else recorded_class_split(run)


def prepare_run(run):
    """The Run with its data (prepared for run.backbone), K, loaders and log: what every later stage reads."""
    args = run.args
    spec = get_dataset_spec(args.dataset)
    splits = build_splits(spec, args, run.backbone.preprocessing)
    run = dataclasses.replace(run, spec=spec.with_classes_of(splits))
    class_split = class_split_of(run)
    if class_split is not None:
        splits = apply_class_split(splits, class_split, run.spec.class_names)
        run = dataclasses.replace(run, class_split=class_split)
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


def backbone_of(args):
    """The BackboneSpec of --backbone at --input_size; UserError where it cannot take that size."""
    try:
        return get_backbone(args.backbone, args.input_size)
    except ValueError as exc:
        raise UserError(f"--backbone {args.backbone}: {exc}") from None


def resolve_backbone(args):
    """The flags with the network resolved: for --test, --query and --export_index with a --checkpoint, as
    hashing.search.api.resolve_network rebuilds it (the checkpoint's record, else its run's log, else the flags: backbone,
    input size, bits and heads, checked against the weights' shapes); else --backbone, or googlenet, the paper's
    default. A flag that contradicts the checkpoint is a UserError; flags at their defaults count as not given."""
    if args.hasher or not ((args.test or args.query or args.export_index) and args.checkpoint
                           and Path(args.checkpoint).is_file()):  # a hasher's file records no network
        return argparse.Namespace(**{**vars(args), "backbone": args.backbone or DEFAULT_BACKBONE})
    defaults = {"backbone": DEFAULT_BACKBONE, "input_size": None, "hash_bit": 48, "experts": 1, "nested_bits": None}
    given = {flag: None if getattr(args, flag) == default else getattr(args, flag)
             for flag, default in defaults.items()}
    settings, *_ = resolve_network(args.checkpoint, {**given, "backbone": args.backbone}, defaults, cli=True)
    return argparse.Namespace(**{**vars(args), **{flag: settings[flag] for flag in defaults}})


def make_network(run):
    """The hash network, starting from pretrained weights when training (--test loads a whole checkpoint)."""
    args, spec = run.args, run.backbone
    if args.weights and not spec.pretrained_available:
        raise UserError(f"--weights: the {spec.name} backbone has no pretrained weights to load")
    heads = dict(experts=args.experts, inference_head=args.inference_head, nested_bits=args.nested_bits)
    if args.trunk_from:
        return load_trunk(build_network(spec, args.hash_bit, **heads), args.trunk_from, spec)
    # a shallow hasher's --test needs its trunk as it was fitted on: the same pretrained weights again
    if not spec.pretrained_available or args.no_pretrained or not (run.trains or args.hasher):
        return build_network(spec, args.hash_bit, **heads)
    state, source = pretrained_state_dict(spec, args.weights, show_progress=not args.no_progress)
    print(f"{spec.name}: pretrained weights from {source}")
    try:
        return build_network(spec, args.hash_bit, pretrained=state, **heads)
    except ValueError as exc:
        raise UserError(f"cannot use {source} for --backbone {spec.name}: {exc}") from None


def load_trunk(network, path, spec):
    """`network` with its trunk's weights from the checkpoint at `path` (--trunk_from), its hash layer as built:
    the trunk parameters' names and shapes must be the checkpoint's."""
    state = read_state_dict(path, "--trunk_from checkpoint", "train that run first or fix the path",
                            "point --trunk_from to a good copy")
    own = network.state_dict()
    trunk = {name: tensor for name, tensor in own.items() if not name.startswith(f"{spec.hash_layer}.")}
    mismatch = describe_mismatch(trunk, {name: tensor for name, tensor in state.items()
                                         if not name.startswith(f"{spec.hash_layer}.")})
    if mismatch:
        raise UserError(f"--trunk_from {path} does not fit the trunk of --backbone {spec.name}: {mismatch}")
    network.load_state_dict({**own, **{name: state[name] for name in trunk}})
    return network


def make_network_on_every_rank(run):
    """make_network on rank 0 first, so that ranks do not download the same pretrained weights at once."""
    context, device = run.context, run.device
    if context.is_main:
        network = make_network(run)
    barrier(context)
    if not context.is_main:
        network = make_network(run)
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if device.type == "cuda" else network


def hyperparameter_values(args, owner, loss_class):
    return {h.name: getattr(args, h.dest(owner)) for h in loss_class.HYPERPARAMETERS}


def given_hierarchy(args, spec, seen=None):
    """The coarse levels of --hierarchy_file, read for this dataset (None without the flag); with `seen` (the
    seen classes of --unseen_classes) cut to those classes, their groups renumbered in order of appearance."""
    if not args.hierarchy_file:
        return None
    try:
        levels = read_hierarchy(args.hierarchy_file, spec.num_classes, spec.class_names).levels
    except ValueError as exc:
        raise UserError(f"--hierarchy_file: {exc}") from None
    if seen is None:
        return levels
    kept = [[level[index] for index in seen] for level in levels]
    return [[list(dict.fromkeys(groups)).index(group) for group in groups] for groups in kept]


def zeta_of_length(args, num_classes, hash_bit, flag):
    """The threshold zeta of --loss for codes of `hash_bit` bits and `num_classes` classes (None for a loss
    without one); `flag` names where the length came from in the error when the code table has no value."""
    if not LOSSES[args.loss].uses_zeta:
        return None
    try:
        zeta, disagreement = codetable.resolve_zeta(hash_bit, num_classes, args.zeta, args.codetable)
    except ValueError as exc:
        from_workbook = args.codetable and args.zeta is None
        raise UserError(f"{f'--codetable {args.codetable}' if from_workbook else flag}: {exc}; or pass --zeta "
                        "VALUE") from None
    if disagreement:
        warn(disagreement)
    return zeta


def build_criterion(args, spec, seen=None):
    """The loss of --loss with its flags, wrapped in hierarchical proxies with --hierarchy K > 0 or
    --hierarchy_file, in collaborative experts with --experts E >= 2 (one such loss per head), and with
    --nested_bits in NestedLoss (one such loss per prefix length, each with the zeta of its length). With `seen`
    (--unseen_classes' seen class indices) the loss knows those classes only: its labels are cut to them."""
    num_classes = spec.num_classes if seen is None else len(seen)
    hierarchy = given_hierarchy(args, spec, seen) or args.hierarchy  # read once, whatever the prefix lengths
    if not getattr(args, "nested_bits", None):  # harnesses may build flags without it
        return criterion_of_length(args, num_classes, hierarchy, args.hash_bit, f"--hash_bit {args.hash_bit}")
    flag = f"--nested_bits {' '.join(map(str, args.nested_bits))}"
    try:
        return build_nested_loss(args.nested_bits,
                                 lambda bits: criterion_of_length(args, num_classes, hierarchy, bits, flag),
                                 args.nested_weights)
    except ValueError as exc:
        raise UserError(f"{flag} with --loss {args.loss}: {exc}") from None


def criterion_of_length(args, num_classes, hierarchy, hash_bit, length_flag):
    """build_criterion for codes of `hash_bit` bits, without nesting, over `num_classes` classes with the
    `hierarchy` (--hierarchy_file's levels or --hierarchy's K) build_criterion resolved."""
    loss_class = LOSSES[args.loss]
    zeta = zeta_of_length(args, num_classes, hash_bit, length_flag)

    def build_head():
        return build_loss(args.loss, num_classes, hash_bit, zeta=zeta, seed=args.seed, hierarchy=hierarchy,
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
        raise UserError(f"{flag} {getattr(args, flag[2:])}"
                        f"{f' ({hash_bit}-bit prefix)' if hash_bit != args.hash_bit else ''}: {exc}") from None


def parameter_groups(args, objective, lr, spec):
    """The optimiser's groups: the network at `lr` and the loss's learnable state at --rate (the paper's
    two groups); with --backbone_lr_mult M != 1 the trunk apart from the hash layer at M * lr; with
    --freeze_backbone the trunk not at all (its parameters are frozen)."""
    network = objective.network
    if args.backbone_lr_mult == 1 and not args.freeze_backbone:
        groups = [{"params": list(network.parameters()), "lr": lr}]
    else:
        trunk, head = trunk_and_head_parameters(network, spec.hash_layer)
        groups = [{"params": head, "lr": lr}]
        if args.freeze_backbone:
            for parameter in trunk:
                parameter.requires_grad_(False)
        else:
            groups.append({"params": trunk, "lr": lr * args.backbone_lr_mult})
    loss_parameters = list(objective.criterion.parameters())
    if loss_parameters:  # SGD rejects an empty group, and losses with fixed targets have no parameters
        groups.append({"params": loss_parameters, "lr": args.rate})
    return groups


def build_scheduler(optimizer, args):
    """--scheduler step (StepLR(--lr_step, --lr_gamma), the paper's) or cosine (to 0 at the last epoch),
    after --warmup_epochs of linear warm-up; stepped once per epoch."""
    warmup = args.warmup_epochs
    if args.scheduler == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)
    else:
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs - warmup))
    if not warmup:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def build_trainer(args, objective, lr, device, spec=None):
    """--optimizer (SGD by default) over parameter_groups(), --scheduler with --warmup_epochs, --clip_grad,
    --freeze_backbone, and --amp's autocast dtype and gradient scaler (both off on the CPU, where they do
    not help). `spec` (the BackboneSpec) names the hash layer for --backbone_lr_mult and --freeze_backbone."""
    optimizer = OPTIMIZERS[args.optimizer](parameter_groups(args, objective, lr, spec), args)
    scheduler = build_scheduler(optimizer, args)
    amp_dtype = None
    if args.amp is not None and device.type == "cuda":
        amp = args.amp if args.amp != "auto" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    trainable_head = hash_head(objective.network, spec.hash_layer) if args.freeze_backbone else None
    return Trainer(objective, objective, optimizer, scheduler, scaler, amp_dtype, clip_grad=args.clip_grad or None,
                   trainable_head=trainable_head)
