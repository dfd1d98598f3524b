"""Train and evaluate deep hashing networks for multi-label image retrieval with the HyP2 loss.

    python retrieval.py --dataset digits --backbone small --hash_bit 48 --epochs 30    # train
    python retrieval.py --dataset digits --backbone small --hash_bit 48 --test         # re-evaluate
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data import DATASETS, get_dataset_spec
from loss import (HIERARCHY_COARSE_WEIGHT, HIERARCHY_REFRESH_EVERY, LOSSES, PROXY_LOSSES, HierarchicalProxyLoss,
                  build_loss, tunable_hyperparameters)
from network import BACKBONES, build_network
from utils import codetable
from utils.checkpoint import load_network_weights, save_state_dict
from utils.device import select_device
from utils.errors import UserError, run_reporting_errors
from utils.metrics import map_at_k
from utils.reproducibility import loader_generator, seed_everything, seed_worker
from utils.runlog import RunLog


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
        splits = spec.build(Path(args.data_root), args.seed, input_size)
    except NotImplementedError as exc:
        raise UserError(str(exc)) from None
    if args.subset:
        splits = type(splits)(*(Subset(part, range(min(args.subset, len(part)))) for part in splits))
    return splits


def make_loaders(splits, args, spec, device):
    workers = args.workers if args.workers >= 0 else (0 if spec.in_memory else min(8, os.cpu_count() or 1))
    common = dict(batch_size=args.batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                  worker_init_fn=seed_worker, persistent_workers=workers > 0)
    train = DataLoader(splits.train, shuffle=True, generator=loader_generator(args.seed), **common)
    query = DataLoader(splits.query, shuffle=False, **common)
    database = DataLoader(splits.database, shuffle=False, **common)
    return train, query, database


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


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, epochs):
    """One pass over the training set; returns the mean loss per sample."""
    model.train()
    criterion.train()
    if hasattr(criterion, "set_epoch"):  # HashNet's continuation
        criterion.set_epoch(epoch)
    total = torch.zeros((), device=device)
    seen = 0
    progress = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, unit="batch", dynamic_ncols=True)
    for step, (images, labels) in enumerate(progress):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(images)
        seen += len(images)
        if step % 10 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    mean_loss = (total / max(seen, 1)).item()
    if not torch.isfinite(torch.tensor(mean_loss)):
        raise UserError(f"the loss became {mean_loss} in epoch {epoch}: lower --lr or --rate")
    return mean_loss


@torch.no_grad()
def encode(model, loader, device, desc):
    """Real-valued codes (N, n) and labels (N, C) of a dataset, on the CPU."""
    model.eval()
    codes, labels = [], []
    for images, targets in tqdm(loader, desc=desc, leave=False, unit="batch", dynamic_ncols=True):
        codes.append(model(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
    return torch.cat(codes), torch.cat(labels)


def evaluate(model, query_loader, database_loader, device, topk):
    """mAP@topk of the query set against the database by Hamming ranking."""
    query_codes, query_labels = encode(model, query_loader, device, "encode queries")
    db_codes, db_labels = encode(model, database_loader, device, "encode database")
    return map_at_k(query_codes, query_labels, db_codes, db_labels, topk)


def train(model, criterion, optimizer, scheduler, loaders, device, args, topk, checkpoint, log):
    """The training loop: evaluate every --eval_every epochs and keep the best checkpoint."""
    train_loader, query_loader, database_loader = loaders
    best_map, best_epoch, train_seconds = -1.0, 0, 0.0
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        loss = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, args.epochs)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_seconds += time.perf_counter() - started
        message = f"epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}  lr {lr:.3g}  train {train_seconds:.1f}s"

        mean_ap = None
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            mean_ap = evaluate(model, query_loader, database_loader, device, topk)
            if mean_ap > best_map:
                best_map, best_epoch = mean_ap, epoch
                if not args.no_save:
                    save_state_dict(model, checkpoint)
                log.best(best_map, best_epoch, str(checkpoint))
            message += f"  mAP@{topk} {mean_ap:.4f}  (best {best_map:.4f} @ epoch {best_epoch})"
        tqdm.write(message)
        log.line(message)
        log.epoch(epoch, loss, lr, train_seconds, mean_ap)
        log.save()
    return best_map, best_epoch, train_seconds


def main(args):
    device = select_device(args.device, args.cuda)
    seed_everything(args.seed)
    spec = get_dataset_spec(args.dataset)
    backbone = BACKBONES[args.backbone]
    splits = build_splits(spec, args, backbone.input_size)
    topk = min(args.retrieve or spec.default_topk or len(splits.database), len(splits.database))
    loaders = make_loaders(splits, args, spec, device)
    try:
        model = build_network(args.backbone, args.hash_bit).to(device)
    except NotImplementedError as exc:
        raise UserError(str(exc)) from None
    checkpoint = Path(args.checkpoint) if args.checkpoint else run_prefix(args).with_suffix(".ckpt")

    if args.test:
        load_network_weights(model, checkpoint, hint="Pass the --backbone and --hash_bit it was trained with.")
        warn_if_data_differs_from_training(checkpoint, args)
        mean_ap = evaluate(model, loaders[1], loaders[2], device, topk)
        print(f"mAP@{topk}: {mean_ap:.4f}  ({args.dataset}, {args.backbone}, {args.hash_bit} bits, {checkpoint})")
        return {"map": mean_ap, "topk": topk}

    criterion = build_criterion(args, spec).to(device)
    loss_settings = criterion.hyperparameters()
    zeta = loss_settings.get("zeta")
    lr = args.lr or backbone.default_lr
    param_groups = [{"params": model.parameters(), "lr": lr}]
    loss_parameters = list(criterion.parameters())
    if loss_parameters:  # SGD rejects an empty group, and losses with fixed targets have no parameters
        param_groups.append({"params": loss_parameters, "lr": args.rate})
    optimizer = torch.optim.SGD(param_groups, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)

    if not args.no_save:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    info = {"num_classes": spec.num_classes, "topk": topk, "zeta": zeta, "device": str(device),
            "loss": {"name": loss_label(args), **loss_settings},
            "sizes": {name: len(part) for name, part in splits._asdict().items()}}
    log = RunLog(run_prefix(args), vars(args), info, enabled=not args.no_save)
    header = (f"{args.dataset} / {args.backbone} / {args.hash_bit} bits: {info['sizes']}, "
              f"{describe_loss(loss_label(args), criterion)}, lr {lr:g}"
              f"{f' (proxies {args.rate:g})' if loss_parameters else ''}, device {device}")
    print(header)
    log.line(header)

    best_map, best_epoch, train_seconds = train(
        model, criterion, optimizer, scheduler, loaders, device, args, topk, checkpoint, log)
    summary = (f"best mAP@{topk} {best_map:.4f} at epoch {best_epoch}; "
               f"checkpoint {'not saved (--no_save)' if args.no_save else checkpoint}; "
               f"training {train_seconds:.1f}s")
    print(summary)
    log.line(summary)
    log.finish()
    return {"map": best_map, "epoch": best_epoch, "topk": topk, "train_seconds": train_seconds}


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    run_reporting_errors(lambda: main(args))


if __name__ == "__main__":
    cli()
