"""The training session: build the loss and optimiser, resume or start the logs, run the epochs
(engine.train), and report the checkpoint --select kept, with one-line messages for what a user can fix
(a diverging loss, Ctrl-C)."""
import dataclasses
import sys
from pathlib import Path

from torch.nn.parallel import DistributedDataParallel

from data.files import truncated_paths, truncation_note
from data.fingerprint import split_fingerprint
from engine import HashingObjective, NonFiniteLoss, Progress, describe_nested_maps, nested_maps, restore_training_state
from engine import train as train_epochs
from hashing.codes import NonFiniteCodes
from hashing.evaluation.class_split import class_split_maps, describe_class_split_maps
from hashing.evaluation.metrics import map_of_codes
from hashing.shallow import build_shallow_hasher
from loss import LOSSES
from utils.checkpoint import read_train_state
from utils.config import read_config
from utils.dist import gather_objects, state_fingerprint
from utils.errors import TrainingInterrupted, UserError
from utils.provenance import describe_provenance, provenance
from utils.runlog import warn

from .checkpoint_tasks import report_best_checkpoint
from .files import dataset_label, run_loss_label
from .parts import build_criterion, build_trainer, described_data_files
from .shallow import fit_hasher, hasher_codes


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
    data_files = described_data_files(run)
    if data_files:
        header += "\ndata files: " + "; ".join(f"{name} {value}" for name, value in data_files.items())
    origin = provenance(run.device)
    header += "\n" + describe_provenance(origin)
    record = {"args": vars(args), "provenance": origin, "num_classes": run.spec.num_classes, "topk": run.topk,
              "data_files": data_files, "backbone": run.backbone.record(args.hash_bit, args.experts),
              "convention": run.convention.as_dict(),
              "zeta": settings.get("zeta"), "device": str(run.device), "world_size": context.world_size,
              "amp": str(trainer.amp_dtype), "loss": {"name": label, **settings}, "sizes": sizes}
    if run.class_split is not None:
        record["class_split"] = run.class_split.as_record(run.spec.class_names)
        header += "\n" + describe_unseen(run)
    if args.config:  # the file's own values; "args" holds the resolved ones, command line included
        record["config"] = {"file": args.config, "values": read_config(args.config)}
    return header, record


def describe_unseen(run):
    """The header's line on --unseen_classes: which classes training never sees."""
    names, unseen = run.spec.class_names, run.class_split.unseen
    listed = ", ".join(names[index] if names else str(index) for index in unseen)
    return (f"unseen classes ({len(unseen)} of {run.spec.num_classes}, held out of training): {listed}; the loss "
            f"knows the other {len(run.class_split.seen)}")


def recipe_note(run):
    """A note for a backbone trained without --config whose family has a recipe other than the flags'
    defaults (the paper's SGD and StepLR), or None."""
    spec = run.backbone
    if run.args.config or spec.family in ("cnn", "small") or spec.source == "paper" or not spec.recipe:
        return None
    return (f"note: --backbone {spec.name} trains with the flags' defaults (--optimizer {run.args.optimizer}, "
            f"--scheduler {run.args.scheduler}); its recipe is {spec.recipe}: add --config {spec.recipe}")


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
               for name, part in run.splits._asdict().items()},
            **({"unseen classes": list(run.class_split.unseen)} if run.class_split else {})}


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
        flags = [f"--{h.dest(args.loss)} {getattr(args, h.dest(args.loss))}"
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
        if progress.epoch and run.saves:
            raise TrainingInterrupted(f"interrupted; the state after epoch {progress.epoch} is in {run.files.last}: "
                                      "rerun the same command with --resume to continue") from None
        raise TrainingInterrupted("interrupted before the first epoch finished; nothing to resume") from None


def training_criterion(run):
    """The loss of the flags; a loss with a memory of the training items is given the training set's size."""
    criterion = build_criterion(run.args, run.spec, run.class_split and run.class_split.seen)
    if getattr(criterion, "uses_item_indices", False):
        if run.context.world_size > 1:
            raise UserError(f"--{run.args.loss}_memory 1 keeps the training set's codes in one process; under "
                            "torchrun each process would hold a different memory: train it in one process")
        criterion.attach_training_set(len(run.splits.train))
    return criterion


def start_training(run, network):
    """The loss, the optimiser, the resumed state and the logs' start: (run, trainer, progress, lr)."""
    args = run.args
    # ============ loss, optimiser and mixed precision ============
    objective = HashingObjective(network, training_criterion(run)).to(run.device)
    lr = args.lr or run.backbone.default_lr
    trainer = build_trainer(args, objective, lr, run.device, run.backbone)
    run = dataclasses.replace(run, data_identity=data_identity(run))
    # ============ optionally resume, then start the logs ============
    progress = resume(run, trainer) if args.resume is not None else Progress()
    header, record = describe_training(run, trainer, lr)
    run.log.start(record, resumed_after=progress.epoch if args.resume is not None else None,
                  best={"map": progress.best_map, "epoch": progress.best_epoch} if progress.best_epoch else None)
    if args.resume is not None:
        run.log.say(f"resumed after epoch {progress.epoch} "
                    f"(kept {run.selection_score_name} {progress.best_map:.4f} at epoch {progress.best_epoch})")
    run.log.say(header)
    note = recipe_note(run)
    if note:
        run.log.say(note, file=sys.stderr)
    # ============ distributed: the objective (network and loss together) under DDP ============
    if run.context.enabled:
        trainer.model = DistributedDataParallel(objective, device_ids=[run.device.index]
                                                if run.device.type == "cuda" else None)
    return run, trainer, progress, lr


def describe_fit(run, hasher):
    """The header line and the record that start the logs of a --hasher run (describe_training's, without a loss
    or an optimiser)."""
    args = run.args
    sizes = {name: len(part) for name, part in run.splits._asdict().items()}
    described = ", ".join(f"{name} {value}" for name, value in hasher.settings.items())
    header = (f"{dataset_label(args)} / {args.backbone} (frozen) / {args.hash_bit} bits: {sizes}, shallow hasher "
              f"{hasher.name}{f' ({described})' if described else ''}, fitted on the training split's trunk features"
              f", no training, device {run.device}")
    origin = provenance(run.device)
    record = {"args": vars(args), "provenance": origin, "num_classes": run.spec.num_classes, "topk": run.topk,
              "data_files": described_data_files(run), "backbone": run.backbone.record(args.hash_bit),
              "convention": run.convention.as_dict(), "device": str(run.device), "world_size": 1,
              "hasher": hasher.describe(), "trained": False, "sizes": sizes}
    return header + "\n" + describe_provenance(origin), record


def fit_shallow_hasher(run, network):
    """--hasher: fit on the training split's trunk features, then evaluate, log and report like a trained run
    (its one evaluation logged as epoch 0, nothing trained); returns what train() returns."""
    hasher = build_shallow_hasher(run.args.hasher, run.args.hash_bit)
    header, record = describe_fit(run, hasher)
    run.log.start(record)
    run.log.say(header)
    seconds = fit_hasher(run, network, hasher)
    codes = hasher_codes(run, network, hasher)
    mean_ap = map_of_codes(codes, run.topk, run.convention)
    selection = {"select": "fit", "epoch": 0}
    run.log.event("epoch", epoch=0, map=mean_ap, train_seconds=seconds, fit_seconds=seconds)
    run.log.event("best", map=mean_ap, epoch=0, checkpoint=str(run.files.checkpoint), select="fit")
    metrics = report_best_checkpoint(run, network, codes, selection) if run.saves else None
    saved = run.files.checkpoint if run.saves else "not saved (--no_save)"
    run.log.say(f"{run.map_name} {mean_ap:.4f} ({hasher.name} fitted on {len(run.splits.train)} training items' "
                f"trunk features, no training); checkpoint {saved}; fit {seconds:.1f}s")
    run.log.event("finish", best={"map": mean_ap, "epoch": 0}, test_map=mean_ap, selection=selection,
                  train_seconds=seconds, trained=False)
    return {"map": mean_ap, "epoch": 0, "topk": run.topk, "selection": selection, "train_seconds": seconds,
            "trained": False, "long_tail": metrics and metrics["long_tail"]}


def train(run, network):
    """Train, keep the checkpoint --select chooses, report it; returns what the run found."""
    if run.args.hasher:
        return fit_shallow_hasher(run, network)
    run, trainer, progress, lr = start_training(run, network)
    selected = train_reporting_failures(run, trainer, progress, lr)
    fingerprints = gather_objects(run.context, state_fingerprint(trainer.objective))
    if run.context.enabled and len(set(fingerprints)) > 1:
        warn("the ranks ended with different models")
    selection = {"select": run.select, "epoch": selected.epoch,
                 **({"val_map": progress.best_map} if run.select == "val" else {})}
    metrics = None
    if progress.best_epoch and run.saves:
        metrics = report_best_checkpoint(run, network, selected.codes, selection)
    by_bits, split_maps = kept_maps(run, selected, metrics)
    run.log.say(summary_line(run, selected, progress, metrics, split_maps, by_bits))
    truncated = report_truncated_images(run)
    run.log.event("finish", best={"map": progress.best_map, "epoch": progress.best_epoch}, test_map=selected.map,
                  selection=selection, train_seconds=progress.train_seconds, truncated_images=truncated,
                  truncated_image_count=len(truncated), **({"map_by_bits": by_bits} if by_bits else {}),
                  **({"class_split_map": split_maps} if split_maps else {}),
                  **({"rank_fingerprints": fingerprints} if run.context.enabled else {}))
    return {"map": selected.map, "epoch": selected.epoch, "topk": run.topk, "selection": selection,
            "train_seconds": progress.train_seconds, "long_tail": metrics and metrics["long_tail"],
            "map_by_bits": by_bits, "class_split_map": split_maps}


def kept_maps(run, selected, metrics):
    """(--nested_bits: each length's mAP, the last the whole code's; --unseen_classes: the mAP by seen-class,
    unseen-class and all-label relevance) of the kept codes, each None without its flag: the metrics' when they
    were written, else (--no_save) computed here, taking the mAP training measured (selected.map) as known."""
    if metrics:
        return metrics.get("map_by_bits"), metrics.get("class_split", {}).get("map")
    by_bits = nested_maps(run, selected.codes, selected.map)
    if run.class_split is None or selected.codes is None or not run.context.is_main:
        return by_bits, None
    whole = (by_bits or {}).get(str(selected.codes.hash_bit))  # the whole code's, by every label
    known = {"seen": selected.map, **({"all": whole} if whole is not None else {})}
    return by_bits, class_split_maps(selected.codes, run.class_split, run.topk, run.convention, known)


def summary_line(run, selected, progress, metrics, split_maps=None, by_bits=None):
    """The run's last line: the kept checkpoint's mAP, how it was selected, where it is, the training time; under
    --unseen_classes (`split_maps`) the mAP by seen-class, unseen-class and all-label relevance, and under
    --nested_bits (`by_bits`) each length's."""
    tail = metrics and metrics["long_tail"]["buckets"]["tail"]["map"]
    val = f", {run.selection_score_name} {progress.best_map:.4f}" if run.select == "val" else ""
    best = "best " if run.select == "test" else ""
    tail_note = f", tail classes {tail:.4f}" if tail is not None else ""
    return (f"{best}{run.test_map_name} {selected.map:.4f} at epoch {selected.epoch} (select {run.select}{val}"
            f"{tail_note}); checkpoint {run.files.checkpoint if run.saves else 'not saved (--no_save)'}; "
            f"training {progress.train_seconds:.1f}s"
            + (f"; {describe_class_split_maps(split_maps)}" if split_maps else "")
            + describe_nested_maps(by_bits, "; "))


def report_truncated_images(run):
    """Print how many distinct truncated images this run's decoding padded (over all ranks), naming the first
    few (data.files.truncation_note); returns all of them, sorted, for the run's event log."""
    found = sorted(set().union(*gather_objects(run.context, truncated_paths(run.splits))))
    note = truncation_note(found)
    if note:
        run.log.say(note)
    return found
