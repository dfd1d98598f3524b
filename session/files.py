"""A run's files: their names, where they go, and the rules that keep them whole.

Every file of a run shares one prefix, OUTPUT_DIR/{dataset}_{backbone}_{hash_bit}[_{loss}]: the
checkpoint (.ckpt, or --checkpoint), the training state (.last.pt), the logs (.txt, .jsonl), the
metrics (.metrics.json), the codes cache (.codes.npz), the figures and the lock (.lock). This module is
the one place that names them (the comparison harnesses and tests read the names from here too), and
the one place that guards them: no invocation writes a file it reads or writes one file twice, a new
training does not silently replace an earlier run, the locks keep two processes out of one run's files
and out of one checkpoint path, and the temporary files of a killed write are cleaned up under them.
"""
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hashing.search.exact import is_binary_index
from network import DEFAULT_BACKBONE, file_label
from utils.atomic import ensure_writable_dir, remove_leftovers
from utils.checkpoint import is_checkpoint_file
from utils.errors import UserError
from utils.lock import run_lock
from utils.paths import check_output_target


def dataset_label(args):
    """The dataset as run names and the codes cache name it: --dataset, plus _ltRHO for --imbalance RHO and
    _VARIANT for a --split_variant given (runs on two COCO list families never share files; a checkpoint trained
    on one family's training images is not tested on the other's queries by accident)."""
    variant = getattr(args, "split_variant", None)
    return args.dataset + (f"_lt{args.imbalance:g}" if args.imbalance != 1 else "") + (f"_{variant}" if variant else "")


def loss_label(name, hierarchy=0, experts=1):
    """The loss as output files and tables name it: the name, plus _hplK with K hierarchical clusters or
    _hpl-NAME with the given hierarchy NAME (a str), plus _eclE with E collaborative heads."""
    if isinstance(hierarchy, str):
        name += f"_hpl-{hierarchy}"
    elif hierarchy:
        name += f"_hpl{hierarchy}"
    return name + (f"_ecl{experts}" if experts > 1 else "")


def run_loss_label(args):
    """loss_label of this run: the loss, its hierarchy (K clusters or the given file's name), its heads; or the
    shallow hasher's name (--hasher), which trains no loss."""
    if getattr(args, "hasher", None):
        return args.hasher
    hierarchy = Path(args.hierarchy_file).stem if args.hierarchy_file else args.hierarchy
    return loss_label(args.loss, hierarchy, args.experts)


def run_name(args):
    """{dataset}_{backbone}_{hash_bit}[_{loss}][_nested{B1-B2-...}]: HyP2 keeps the paper's names, other losses
    append theirs, and a --nested_bits run its lengths (it never shares files with a plain run of its bits)."""
    label = run_loss_label(args)
    backbone = file_label(args.backbone or DEFAULT_BACKBONE)
    nested = getattr(args, "nested_bits", None)
    return (f"{dataset_label(args)}_{backbone}_{args.hash_bit}" + ("" if label == "hyp2" else f"_{label}")
            + (f"_nested{'-'.join(map(str, nested))}" if nested else ""))


def export_index_path(args):
    """Where --export_index writes: the path as given when it names a folder (./index too), else a bare file
    name inside --output_dir, with the run's other files (not in the current folder, which may be a checkout
    where it is not git-ignored); None without the flag."""
    if not args.export_index:
        return None
    if os.path.dirname(args.export_index):
        return Path(args.export_index)
    return Path(args.output_dir) / args.export_index


def checkpoint_lock(checkpoint):
    """The lock that every training writing `checkpoint` takes, whatever its --output_dir: X.lock for X.ckpt
    (so the default checkpoint's is its run's lock), else the checkpoint's name + .lock."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".ckpt") + ".lock")


@dataclass(frozen=True)
class RunFiles:
    """The files of one run: prefix = OUTPUT_DIR/{run_name}; the checkpoint may be elsewhere (--checkpoint);
    index is where --export_index writes (None without it)."""
    prefix: Path
    checkpoint: Path
    index: Path = None

    @classmethod
    def for_args(cls, args):
        prefix = Path(args.output_dir) / run_name(args)
        # name + ".ckpt", not with_suffix: a run name may hold a dot (digits_lt2.5_small_48)
        checkpoint = Path(args.checkpoint) if args.checkpoint else prefix.with_name(prefix.name + ".ckpt")
        return cls(prefix, checkpoint, export_index_path(args))

    def with_suffix(self, suffix):
        return self.prefix.with_name(self.prefix.name + suffix)

    @property
    def last(self):
        return self.with_suffix(".last.pt")

    @property
    def text_log(self):
        return self.with_suffix(".txt")

    @property
    def event_log(self):
        return self.with_suffix(".jsonl")

    @property
    def metrics(self):
        return self.with_suffix(".metrics.json")

    @property
    def codes(self):
        return self.with_suffix(".codes.npz")

    def figure(self, kind, extension="png"):
        return self.with_suffix(f".{kind}.{extension}")

    def locks(self, writes_checkpoint=True):
        """[(lock file, the flag that moves the output elsewhere)] covering what the run writes: the prefix's
        lock, and when training writes the checkpoint, the checkpoint path's (checkpoint_lock), so two runs
        with one --checkpoint and different --output_dir cannot both write it."""
        locks = [(self.with_suffix(".lock"), "--output_dir")]
        if writes_checkpoint and checkpoint_lock(self.checkpoint).resolve() != locks[0][0].resolve():
            locks.append((checkpoint_lock(self.checkpoint), "--checkpoint"))
        return locks

    def own_files(self):
        """Every file of the run (what another invocation's output must not land on)."""
        return [self.checkpoint, self.last, self.text_log, self.event_log, self.metrics, self.codes]


def written_and_read(run):
    """([(what, path) written], [(what, path) read]) by this invocation."""
    args, files = run.args, run.files
    written = []
    if run.saves:
        written += [("the codes cache", files.codes), ("the metrics file", files.metrics)]
        if run.trains:
            written += [("--checkpoint", files.checkpoint), ("the training state", files.last),
                        ("the text log", files.text_log), ("the event log", files.event_log)]
    if files.index:  # last: checked against the run's own outputs too, it is refused naming the one it would hit
        written.append(("--export_index", files.index))
    read = [("--config", args.config), ("--weights", args.weights), ("--codetable", args.codetable),
            ("--trunk_from", getattr(args, "trunk_from", None)),
            ("--resume", args.resume or None),
            # a path, not one of the shipped hierarchies' names
            ("--hierarchy_file", args.hierarchy_file if args.hierarchy_file and Path(args.hierarchy_file).exists()
             else None)]
    read += [("--query", path) for path in args.query or []]
    if not run.trains:
        read.append(("--checkpoint", files.checkpoint))
        # The run's other files are not this invocation's to overwrite either (--export_index onto .last.pt),
        # but for the codes cache and the metrics file that it rewrites itself.
        rewritten = {path for what, path in written if what != "--export_index"}
        read += [(f"this run's {path.name}", path) for path in files.own_files()
                 if path != files.checkpoint and path not in rewritten]
    return written, [(what, path) for what, path in read if path]


# The outputs a user can aim at any file (--checkpoint, --export_index) replace only a file of their own kind,
# whatever --overwrite says: `--checkpoint D/train.txt --overwrite` once replaced a split list with a checkpoint.
OUTPUT_KINDS = {"--export_index": ("a FAISS binary index", is_binary_index),
                "--checkpoint": ("a checkpoint (torch.save's format)", is_checkpoint_file),
                "the training state": ("a training state (torch.save's format)", is_checkpoint_file)}


def check_paths(run):
    """Every output is absent or a regular file that is none of the inputs, and no file is written twice
    (--export_index onto the checkpoint once replaced it with an 81-byte index); the checkpoint, the training
    state and --export_index replace only an earlier file of their kind, never another (a split list, an image)."""
    written, read = written_and_read(run)
    earlier = list(read)
    resumed = run.args.resume is not None  # the training state is read first, and refused there if it is not one
    for what, path in written:
        kind = None if resumed and what == "the training state" else OUTPUT_KINDS.get(what)
        check_output_target(path, what, earlier, earlier_output=kind)
        earlier.append((what, path))


def remove_interrupted_writes(files):
    """The hidden temporary files a killed run left next to this run's files (under the run lock)."""
    removed = sum(remove_leftovers(path) for path in (files.checkpoint, files.last, files.codes, files.metrics))
    if removed:
        print(f"note: removed {removed} temporary file(s) of an interrupted write next to {files.checkpoint}",
              file=sys.stderr)


def refuse_to_replace_a_run(run):
    """A new training (no --resume) into a run's files stops, unless --overwrite: then the new run replaces
    them file by file as it writes its own (atomically, so a failing new run leaves the old files whole)."""
    files = run.files
    if not run.trains or not run.saves or run.args.resume is not None:
        return
    existing = [path for path in (files.checkpoint, files.last) if path.exists()]
    if existing and not run.args.overwrite:
        raise UserError(f"{existing[0]} holds an earlier run: continue it with --resume, keep it by choosing "
                        "another --output_dir, or start afresh with --overwrite")


@contextlib.contextmanager
def guarded_run_files(run):
    """While the block runs, this process alone writes the run's files (utils/lock.py): the output folder
    (and --export_index's) is writable, the locks are held, leftovers of a killed write are gone and an earlier run is not
    replaced by accident. A process that writes nothing takes no lock."""
    with contextlib.ExitStack() as stack:
        if run.files.index and run.context.is_main:
            ensure_writable_dir(run.files.index.parent, "--export_index")
        if run.writes:
            ensure_writable_dir(run.args.output_dir)
            if run.trains:
                ensure_writable_dir(run.files.checkpoint.parent, "--checkpoint")
            for lock, elsewhere in run.files.locks(writes_checkpoint=run.trains):
                stack.enter_context(run_lock(lock, elsewhere=elsewhere))
            remove_interrupted_writes(run.files)
        if run.context.is_main:
            refuse_to_replace_a_run(run)
        yield

