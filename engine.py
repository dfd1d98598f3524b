"""The training engine: one epoch of training, encoding a split into binary codes, evaluation by mAP@K,
and the epoch loop that keeps the best checkpoint and the resumable training state.

In the style of torchvision's references/detection/engine.py: these functions take the parts they
drive (a model, loaders, an optimiser); session/parts.py builds the parts and retrieval.py wires them.
`run` is the invocation's session.run.Run (device, processes, data, K, files, log), read here and never
changed, so no function here takes more than a handful of arguments.
"""
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from hashing.codes import CodeSet
from hashing.evaluation.conventions import Convention
from hashing.evaluation.class_split import restricted_codes
from hashing.evaluation.metrics import map_by_bits, map_of_codes
from utils.checkpoint import load_network_weights, non_finite_names, save_state_dict, save_train_state
from utils.dist import (DistContext, all_true, broadcast_object, gather_rows, sum_over_ranks,
                        sync_buffers)
from utils.reproducibility import capture_rng_state, restore_rng_state
from utils.runlog import progress_bar
from utils.timing import TimedIterable, peak_memory_bytes, reset_peak_memory


class Loaders(NamedTuple):
    """The training loader (each rank a 1/world share of every global batch) and this rank's shards of
    the query set and the database (cut at batch boundaries, see utils/dist.py shard_bounds)."""
    train: DataLoader
    query: DataLoader
    database: DataLoader


class HashingObjective(nn.Module):
    """Network and loss as one module, so DDP also synchronises the loss's learnable state (proxies)."""

    def __init__(self, network, criterion):
        super().__init__()
        self.network = network
        self.criterion = criterion

    def forward(self, images, labels, indices=None):
        codes = self.network(images)
        with torch.autocast(device_type=codes.device.type, enabled=False):  # the loss in float32
            if getattr(self.criterion, "uses_item_indices", False):
                return self.criterion(codes.float(), labels, indices)
            return self.criterion(codes.float(), labels)


@dataclass
class Trainer:
    """What one optimisation step drives. `model` is what is called (the objective, DDP-wrapped when
    distributed); `objective` is the same module without the wrapper (torchvision's model_without_ddp)."""
    model: nn.Module
    objective: HashingObjective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype = None  # None: no autocast
    clip_grad: float = None  # --clip_grad: the largest gradient norm, None for no clipping
    # --freeze_backbone: the only part of the network in training mode (the frozen trunk's BatchNorm
    # statistics and dropout stay as in evaluation); None trains the whole network
    trainable_head: nn.Module = None


@dataclass
class Progress:
    """Where training stands after the last completed epoch (saved in .last.pt)."""
    epoch: int = 0
    best_map: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0


SELECTION_RULES = ("test", "val", "last")  # --select; docs/METHOD.md §10


class Selected(NamedTuple):
    """The checkpoint training kept: its test-query mAP and codes (codes None when that evaluation
    predates a resume, so report_best_checkpoint encodes the saved checkpoint)."""
    map: float
    epoch: int
    codes: CodeSet = None


class NonFiniteLoss(Exception):
    def __init__(self, value, epoch, step):
        super().__init__(f"the loss became {value} in epoch {epoch}, iteration {step}")
        # Before the first optimiser step the learning rates cannot be at fault: the loss's settings are.
        self.before_any_step = (epoch, step) == (1, 1)


class NonFiniteParameters(NonFiniteLoss):
    """The network's parameters or buffers became NaN or infinite (the loss may still look finite)."""

    def __init__(self, name, epoch):
        Exception.__init__(self, f"the network's {name} became NaN or infinite in epoch {epoch}")
        self.before_any_step = False


def to_device(images, device):
    images = images.to(device, non_blocking=True)
    # cached trunk features (--feature_cache) are (B, D): only image batches have a channels-last layout
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and images.ndim == 4 \
        else images


class EpochStats(NamedTuple):
    """One epoch of training: the mean loss per sample over all ranks, where this process's time went
    (waiting for the data loader, the rest being compute), images per second over all ranks, and the peak
    memory (utils/timing.py)."""
    loss: float
    seconds: float
    data_wait_seconds: float
    images: int
    peak_memory_bytes: int = None

    @property
    def data_wait_share(self):
        return self.data_wait_seconds / self.seconds if self.seconds > 0 else 0.0

    def as_record(self):
        return {"data_wait_seconds": self.data_wait_seconds, "compute_seconds": self.seconds - self.data_wait_seconds,
                "images_per_second": self.images / self.seconds if self.seconds > 0 else None,
                "peak_memory_bytes": self.peak_memory_bytes}


def train_one_epoch(trainer, loader, device, epoch, context=DistContext()):
    """One pass over the training set; returns its EpochStats."""
    trainer.model.train()
    if trainer.trainable_head is not None:
        trainer.objective.network.eval()
        trainer.trainable_head.train()
    total = torch.zeros((), device=device)
    seen = 0
    reset_peak_memory(device)
    started = time.perf_counter()
    batches = TimedIterable(loader)
    bar = progress_bar(batches, desc=f"epoch {epoch}", unit="batch")
    for step, (images, labels, *indices) in enumerate(bar, start=1):  # the training loader adds item indices
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        indices = indices[0].to(device) if indices else None
        with torch.autocast(device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
            loss = trainer.model(images, labels, indices)
        if not all_true(context, torch.isfinite(loss).item(), device):
            raise NonFiniteLoss(loss.item(), epoch, step)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        if trainer.clip_grad is not None:
            trainer.scaler.unscale_(trainer.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(trainer.objective.parameters(), trainer.clip_grad)
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        total += loss.detach() * len(images)
        seen += len(images)
        if step % 10 == 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.perf_counter() - started
    total, seen = sum_over_ranks(context, [total.item(), seen], device)
    return EpochStats(total / max(seen, 1), seconds, batches.wait_seconds, int(seen), peak_memory_bytes(device))


@torch.inference_mode()
def encode(network, loader, device, context=DistContext(), desc="encode"):
    """Real-valued outputs (N, n) and labels (N, C) of a dataset, on the CPU, gathered over ranks."""
    network.eval()
    outputs, labels = [], []
    for images, targets in progress_bar(loader, desc=desc, unit="batch"):
        outputs.append(network(to_device(images, device)).float().cpu())
        labels.append(targets.float())
    if not outputs:  # a rank whose shard is empty
        outputs, labels = [torch.empty(0, 0)], [torch.empty(0, 0)]
    return gather_rows(context, torch.cat(outputs), device), gather_rows(context, torch.cat(labels), device)


def encode_splits(network, loaders, device, context=DistContext()):
    """The packed codes and labels of the query set and the database (gathered over ranks)."""
    return CodeSet.from_outputs(*encode(network, loaders.query, device, context, "encode queries"),
                                *encode(network, loaders.database, device, context, "encode database"))


def evaluate(network, loaders, device, topk, context=DistContext(), convention=Convention(), timings=None,
             classes=None):
    """(mAP@topk of the queries against the database by Hamming ranking, the same on every rank; the
    codes it was computed from). `timings`, a dict, receives encode_seconds and metric_seconds. With `classes`
    (--unseen_classes' seen classes) relevance counts those classes only (docs/METHOD.md §13)."""
    started = time.perf_counter()
    codes = encode_splits(network, loaders, device, context)
    encoded = time.perf_counter()
    mean_ap = map_by_classes(codes, topk, convention, classes) if context.is_main else None
    if timings is not None:
        timings.update(encode_seconds=encoded - started, metric_seconds=time.perf_counter() - encoded)
    return broadcast_object(context, mean_ap), codes


def map_by_classes(codes, topk, convention, classes=None):
    """map_of_codes, by the labels of `classes` only when given (0 when no query holds one of them)."""
    if classes is None:
        return map_of_codes(codes, topk, convention)
    scored = restricted_codes(codes, classes)
    return 0.0 if scored is None else map_of_codes(scored, topk, convention)


def set_epoch(train_loader, criterion, seed, epoch):
    """Shuffling and DataLoader worker seeds as functions of (seed, epoch), so a resumed run replays the
    batches of an uninterrupted one; and the epoch for losses that schedule on it (HashNet)."""
    train_loader.sampler.set_epoch(epoch)
    train_loader.generator.manual_seed(seed * 1_000_003 + epoch)
    if hasattr(criterion, "set_epoch"):
        criterion.set_epoch(epoch)


def training_state(trainer, progress):
    """Everything --resume needs to continue exactly, in types torch.load(weights_only=True) accepts."""
    return {"network": trainer.objective.network.state_dict(), "loss": trainer.objective.criterion.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(), "progress": asdict(progress), "rng": capture_rng_state()}


def restore_training_state(trainer, state, device):
    """Load a training_state() into the trainer's parts; returns the Progress to continue from."""
    trainer.objective.network.load_state_dict(state["network"])
    trainer.objective.criterion.load_state_dict(state["loss"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    trainer.objective.to(device)
    return Progress(**state["progress"])


def evaluate_for_selection(run, network, timings=None):
    """(the mAP that --select compares, the test-query codes or None). --select val ranks the validation
    queries against their own database and never encodes the test queries."""
    if run.select == "val":
        return evaluate(network, run.validation, run.device, run.validation_topk, run.context, run.convention,
                        timings)[0], None
    return evaluate(network, run.loaders, run.device, run.topk, run.context, run.convention, timings,
                    seen_classes(run))


def seen_classes(run):
    """The classes the test-query mAP of training is judged by: under --unseen_classes the seen ones, as
    DSH_Analysis selects its checkpoint by them (docs/METHOD.md §13); None (every class) otherwise."""
    return None if run.class_split is None else run.class_split.seen


def evaluate_selected(run, network, progress, best_state):
    """--select val, after the last epoch: the kept epoch's weights (in memory, else the saved
    checkpoint), evaluated once on the test queries."""
    if best_state is not None:
        network.load_state_dict(best_state)
    else:
        load_network_weights(network, run.files.checkpoint)
    test_map, codes = evaluate(network, run.loaders, run.device, run.topk, run.context, run.convention,
                               classes=seen_classes(run))
    return Selected(test_map, progress.best_epoch, codes)


class Kept(NamedTuple):
    """What the epoch loop holds of the checkpoint kept so far: the test-query codes of its evaluation
    (None under --select val) and, under --select val, its weights for the final test evaluation."""
    codes: CodeSet = None
    state: dict = None


def nested_maps(run, codes, test_map=None):
    """--nested_bits: {str(b): mAP of the b-bit prefixes} of the test-query codes (the last length is the whole
    code, which --select compares); None without nesting or codes (docs/METHOD.md §14). `test_map`, the codes'
    mAP as evaluate() measured it, is the whole code's unless --unseen_classes judged it by the seen classes."""
    lengths = getattr(run.args, "nested_bits", None)
    if not lengths or codes is None or not run.context.is_main:
        return None
    whole_map = test_map if seen_classes(run) is None else None
    return map_by_bits(codes, lengths, run.topk, run.convention, whole_map)


def describe_nested_maps(by_bits, lead=", "):
    """'' or ', by bits: 16 0.6123, 32 0.7012, 64 0.7301' (after `lead`)."""
    if not by_bits:
        return ""
    return lead + "by bits: " + ", ".join(f"{bits} {value:.4f}" for bits, value in by_bits.items())


def evaluate_and_keep(run, network, progress, epoch, kept, entry):
    """Evaluate after `epoch` into `entry` (the epoch's event); when --select keeps this epoch, save its
    checkpoint and return the new Kept, else return `kept`. Returns (kept, the epoch line's addition)."""
    key = "val_map" if run.select == "val" else "map"
    timings = {}
    entry[key], codes = evaluate_for_selection(run, network, timings)
    entry["evaluation"] = timings
    by_bits = nested_maps(run, codes, entry[key])
    if by_bits:
        entry["map_by_bits"] = by_bits
    if run.select == "last" or entry[key] > progress.best_map:
        progress.best_map, progress.best_epoch = entry[key], epoch
        state = None
        if run.select == "val":
            state = {name: value.detach().clone() for name, value in network.state_dict().items()}
        kept = Kept(codes, state)
        if run.writes:
            save_state_dict(network, run.files.checkpoint)
        run.log.event("best", map=entry[key], epoch=epoch, checkpoint=str(run.files.checkpoint), select=run.select)
    return kept, f"  {run.selection_score_name} {entry[key]:.4f}{describe_nested_maps(by_bits)}  (kept " \
                 f"{progress.best_map:.4f} @ epoch {progress.best_epoch})"


def train(run, trainer, progress):
    """The epoch loop: train, evaluate every --eval_every epochs and after the last, keep the checkpoint
    --select chooses, and write the resumable state after every epoch. Returns the Selected checkpoint."""
    args, network, criterion = run.args, trainer.objective.network, trainer.objective.criterion
    kept = Kept()
    for epoch in range(progress.epoch + 1, args.epochs + 1):
        started = time.perf_counter()
        set_epoch(run.loaders.train, criterion, args.seed, epoch)
        stats = train_one_epoch(trainer, run.loaders.train, run.device, epoch, run.context)
        sync_buffers(run.context, trainer.objective)
        non_finite = non_finite_names(network.state_dict())
        if non_finite:  # never saved as "best" nor as the state to resume from
            raise NonFiniteParameters(non_finite[0], epoch)
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.scheduler.step()
        progress.train_seconds += time.perf_counter() - started
        record = stats.as_record()
        line = (f"epoch {epoch:3d}/{args.epochs}  loss {stats.loss:.4f}  lr {lr:.3g}  "
                f"train {progress.train_seconds:.1f}s  data {stats.data_wait_share:.0%}  "
                f"{record['images_per_second'] or 0:.0f} img/s")
        entry = {"epoch": epoch, "loss": stats.loss, "lr": lr, "train_seconds": progress.train_seconds, **record}
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            kept, evaluated = evaluate_and_keep(run, network, progress, epoch, kept, entry)
            line += evaluated
        progress.epoch = epoch
        run.log.say(line)
        run.log.event("epoch", **entry)
        if run.writes:
            save_train_state(run.files.last, {**training_state(trainer, progress), "data": run.data_identity},
                             vars(args))
    if run.select == "val":
        return evaluate_selected(run, network, progress, kept.state)
    return Selected(progress.best_map, progress.best_epoch, kept.codes)
