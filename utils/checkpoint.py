"""Checkpoints and weight files, read with weights_only=True and written atomically.

- result/{run}.ckpt: the best network as a plain state_dict, the paper code's format.
- result/{run}.last.pt: the whole training state after the latest epoch, for --resume.
- a backbone's pretrained weights: utils/weights.py.
"""
import hashlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import UserError
from .paths import MiB, open_regular, require_regular_file

TRAIN_STATE_FORMAT = "hyp2-retrieval/train-state/1"
NETWORK_FORMAT = "hyp2-retrieval/network/1"  # a checkpoint that records its backbone (save_state_dict)
SHALLOW_FORMAT = "hyp2-retrieval/shallow-hasher/1"  # a fitted shallow hasher (hashing/shallow.py), not a network
# Flags that define what is trained; a state saved under other values cannot be resumed.
IDENTITY_FLAGS = ("dataset", "backbone", "hash_bit", "loss", "hierarchy", "hierarchy_file", "experts", "imbalance",
                  "select", "val_size", "input_size", "freeze_backbone", "backbone_lr_mult", "scheduler",
                  "warmup_epochs", "optimizer", "nested_bits")
# Flags that change the result when they differ on resume; allowed, but the user is told.
RECIPE_FLAGS = ("batch_size", "lr", "rate", "beta", "seed", "subset", "amp", "momentum", "weight_decay", "lr_step",
                "lr_gamma", "clip_grad")
# What a checkpoint's record (or its run's log) may say about its network, checked before anything is built from
# it: a 400 KB file saying input_size 64000 (vit_b_32) or hash_bit 4000000 would make gigabytes of weights first.
NETWORK_BOUNDS = {"hash_bit": 8192, "experts": 64, "input_size": 2048}
# torch.save stores its members uncompressed; a deflated one may inflate a small file into gigabytes (a zip bomb)
# inside torch.load, so a file whose members unpack to more than its own size and this much is refused unread.
MAX_INFLATION = 64 * MiB
# A vision transformer's position embedding holds its patch grid and a few more tokens (class, registers).
MAX_EXTRA_TOKENS = 8


def save(obj, path):
    """torch.save into memory, then an atomic write of the bytes: torch.save writing to a file itself turns
    a full disk (ENOSPC) into a RuntimeError, which atomic_write could not report as one line."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), binary=True)


def check_inflation(path, what, unreadable):
    """UserError when the zip archive at `path` (torch.save's format) unpacks to more than its own size and
    MAX_INFLATION, as the members' declared sizes say, before torch.load inflates any of them."""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip archive (torch.load refuses it with its own message) or unreadable
    if unpacked > os.path.getsize(path) + MAX_INFLATION:
        raise UserError(f"{what} {path} unpacks to {unpacked / MiB:,.1f} MiB from {os.path.getsize(path) / MiB:,.1f} "
                        f"MiB (compressed members, which torch.save never writes): it is not a checkpoint of this "
                        f"tool, and inflating it could exhaust the memory; {unreadable}")


def read_saved(path, what, missing, unreadable, mmap=False):
    """Whatever this tool saved at `path` (torch.save's format, read with weights_only=True), with the checks of
    every checkpoint reader; `what` names the kind of file and `missing`/`unreadable` say what to do."""
    if Path(path).exists():  # a FIFO would block torch.load forever, a device would be read without end
        require_regular_file(path, what)
        check_inflation(path, what, unreadable)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"no {what} at {path}: {missing}") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {what} {path} ({type(exc).__name__}): the file is truncated, "
                        f"corrupt or not a PyTorch checkpoint; {unreadable}") from None


def non_finite_names(state):
    """Names of a state_dict's floating-point tensors that hold a NaN or an infinity."""
    return [name for name, tensor in state.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def require_finite(state, path, advice="it comes from a diverged training; retrain with a lower --lr"):
    """UserError naming the file and a tensor when a state_dict holds a NaN or an infinity."""
    non_finite = non_finite_names(state)
    if non_finite:
        raise UserError(f"{path} holds NaN or infinite values ({len(non_finite)} tensors, e.g. {non_finite[0]}): "
                        f"{advice}")


def check_network_settings(settings, source, advice="it is damaged or not of this tool; retrain, or point "
                                                   "--checkpoint to a good copy"):
    """UserError unless each of hash_bit, experts and input_size in `settings` (a mapping) is absent, None or an
    integer within NETWORK_BOUNDS; `source` names where the values come from and `advice` what to do."""
    for name, upper in NETWORK_BOUNDS.items():
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper):
            raise UserError(f"{source}: {name} {value!r} is not an integer from 1 to {upper}; {advice}")


def is_checkpoint_file(path):
    """Whether `path` is a regular file laid out as torch.save writes one (a zip archive with a data.pkl member): how
    a training recognises its earlier checkpoint or training state, the one kind of existing file it replaces."""
    try:
        with open_regular(path, "checkpoint") as handle, zipfile.ZipFile(handle) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (UserError, OSError, ValueError, zipfile.BadZipFile):
        return False


def require_checkpoint_file(path):
    """Before any data is built (or downloaded): the checkpoint --test/--query/--export_index use exists
    and is a readable file, else a UserError that says what to do."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: train first (the same command without --test) or pass "
                        "--checkpoint PATH")
    require_regular_file(path, "--checkpoint")
    if not os.access(path, os.R_OK):
        raise UserError(f"--checkpoint {path} is not readable (permission denied); fix its permissions")


def save_state_dict(module, path):
    """The network's state_dict at `path`: plain (the paper code's format) for the paper's backbones, or,
    for a network carrying a `backbone_record` (network.build_network), with that record, so that the
    checkpoint rebuilds its network alone."""
    state = {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
    record = getattr(module, "backbone_record", None)
    save(state if record is None else {"format": NETWORK_FORMAT, "backbone": record, "state_dict": state}, path)


def read_backbone_record(path):
    """The backbone record of a self-describing checkpoint, or None for a plain state_dict (the paper's
    backbones); UserError for an unreadable file. Memory-maps the file, so a large checkpoint is not read."""
    state = read_saved(path, "checkpoint", "train first or pass --checkpoint PATH",
                       "retrain or point --checkpoint to a good copy", mmap=True)
    if isinstance(state, dict) and state.get("format") == NETWORK_FORMAT:
        record = state.get("backbone")
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise UserError(f"{path} has a damaged backbone record; retrain or point --checkpoint to a good copy")
        check_network_settings(record, f"the backbone record of {path}")
        return record
    return None


def read_state_dict(path, what="checkpoint",
                    missing="train first (the same command without --test) or pass --checkpoint PATH",
                    unreadable="retrain or point --checkpoint to a good copy", mmap=False):
    """The state_dict stored at `path`, with a UserError for a missing or unreadable file or one holding a NaN or
    an infinity (unless mmap: then only its tensors' shapes are looked at, nothing is read); `what` names
    the kind of file and `missing`/`unreadable` say what to do, in the messages."""
    state = read_saved(path, what, missing, unreadable, mmap=mmap)
    if isinstance(state, dict) and state.get("format") == TRAIN_STATE_FORMAT:
        state = state["network"]  # a .last.pt holds the network too
    elif isinstance(state, dict) and state.get("format") == NETWORK_FORMAT:
        state = state.get("state_dict")
    elif isinstance(state, dict) and state.get("format") == SHALLOW_FORMAT:
        raise UserError(f"{path} is a fitted shallow hasher ({state.get('name')}), not a network: use it with "
                        f"--hasher {state.get('name')} --freeze_backbone")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a network state_dict")
    if not mmap:
        require_finite(state, path, "it comes from a diverged training; retrain with a lower --lr" if
                       what == "checkpoint" else f"it is damaged; {unreadable}")
    return state


def weights_layout(state, hash_layer):
    """(name, shape, heads, position tokens) that a network state_dict's tensors imply: the name and shape of its
    hash layer's weight (`hash_layer`, the BackboneSpec's, or heads.0 of a multi-head network), the number of heads
    (None when they are not numbered 0, 1, ...), and the token count of a vision transformer's position embedding
    (None where a tensor is not there)."""
    heads = sorted(int(match[1]) for match in map(re.compile(r"heads\.(\d+)\.weight").fullmatch, state) if match)
    name = "heads.0.weight" if heads else f"{hash_layer}.weight"
    weight = state.get(name)
    shape = tuple(weight.shape) if weight is not None and weight.ndim == 2 else None
    tokens = next((tensor.shape[1] for key, tensor in state.items()
                   if key.endswith(("pos_embedding", "pos_embed")) and tensor.ndim == 3), None)
    count = None if heads != list(range(len(heads))) else len(heads) or 1
    return name, shape, count, tokens


def check_weights_fit(path, spec, hash_bit, experts, hint=""):
    """Before a network is built: UserError when the network of BackboneSpec `spec` with `hash_bit` bits and
    `experts` heads does not have the shapes of the weights in the checkpoint at `path` (its hash layer, its heads,
    a vision transformer's patch grid at spec.input_size). The file is memory-mapped, not read."""
    name, shape, heads, tokens = weights_layout(read_state_dict(path, mmap=True), spec.hash_layer)
    problems = []
    if shape is not None and shape[0] != hash_bit:
        problems.append(f"{name} is {shape} in the checkpoint but {(hash_bit, *shape[1:])} in the model: it gives "
                        f"{shape[0]} bits, not {hash_bit}")
    if heads != experts:
        problems.append(f"it has {heads if heads is not None else 'damaged'} heads, not {experts}")
    grid = (spec.input_size // spec.patch_size) ** 2 if spec.patch_size else None
    if grid is not None and tokens is not None and not 0 <= tokens - grid <= MAX_EXTRA_TOKENS:
        problems.append(f"its position embedding has {tokens} tokens, not the {grid} patches (and a class token) "
                        f"of {spec.input_size}-pixel inputs")
    if problems:
        raise UserError(f"checkpoint {path} does not fit the network described for it ({spec.name}, {hash_bit} bits, "
                        f"{experts} head(s), {spec.input_size}-pixel inputs): {'; '.join(problems)}. {hint}".strip())


def describe_mismatch(expected, found):
    """One sentence on how two state_dicts differ (missing/unexpected names, differing shapes)."""
    problems = []
    shapes = [f"{name} is {tuple(found[name].shape)} in the checkpoint but {tuple(t.shape)} in the model"
              for name, t in expected.items() if name in found and found[name].shape != t.shape]
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if shapes:
        problems.append("; ".join(shapes[:3]) + (f" (and {len(shapes) - 3} more)" if len(shapes) > 3 else ""))
    if missing:
        problems.append(f"{len(missing)} parameters missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected parameters (e.g. {unexpected[0]})")
    return "; ".join(problems)


def load_network_weights(module, path, hint=""):
    """Load `path` into `module`, refusing (UserError) a checkpoint of another architecture."""
    state = read_state_dict(path)
    mismatch = describe_mismatch(module.state_dict(), state)
    if mismatch:
        raise UserError(f"checkpoint {path} does not fit this network: {mismatch}. {hint}".strip())
    module.load_state_dict(state)


def content_digest(value):
    """SHA-256 (hex) of a state's content in a canonical walk: mappings by sorted keys, sequences in order, tensors
    by dtype, shape and bytes, anything else by repr. It depends on what a state holds, not on how torch.save laid
    out its bytes, so a state is checked after loading, and ranks' models compared (utils/dist.state_fingerprint)."""
    digest = hashlib.sha256()

    def feed(tag, data):  # tagged and length-prefixed, so that no two contents feed the same bytes
        data = data.encode() if isinstance(data, str) else data
        digest.update(tag + len(data).to_bytes(8, "little"))
        digest.update(data)

    def walk(item):
        if isinstance(item, dict):
            feed(b"d", str(len(item)))
            for key in sorted(item, key=repr):
                feed(b"k", repr(key))
                walk(item[key])
        elif isinstance(item, (list, tuple)):
            feed(b"l", str(len(item)))
            for element in item:
                walk(element)
        elif isinstance(item, torch.Tensor):
            feed(b"t", f"{item.dtype} {tuple(item.shape)}")
            feed(b"b", item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            feed(b"s", repr(item))

    walk(value)
    return digest.hexdigest()


def save_train_state(path, state, args):
    """The training state with the digest of its content (content_digest), which read_train_state verifies."""
    state = {"format": TRAIN_STATE_FORMAT, "args": dict(args), **state}
    save({**state, "content_sha256": content_digest(state)}, path)


def check_content(path, state):
    """UserError when the state's content differs from the digest recorded when it was saved (a flipped bit in
    its tensors would otherwise resume silently); states written before digests were recorded have none."""
    recorded = state.pop("content_sha256", None)
    if recorded is not None and recorded != content_digest(state):
        raise UserError(f"{path} is damaged: its content differs from the digest recorded when it was saved; "
                        "resume from a good copy of it, or start without --resume")


def check_same_data(path, saved, current):
    """UserError when a training state was saved on other data or by a run with other files."""
    if saved is None or current is None:
        return
    if saved.get("checkpoint") != current["checkpoint"]:
        raise UserError(f"{path} is the state of the run whose checkpoint is {saved.get('checkpoint')}, not "
                        f"{current['checkpoint']}; resume with the --output_dir (and --checkpoint) of that run")
    differing = [name for name in current if name != "checkpoint" and saved.get(name) != current[name]]
    if differing:
        raise UserError(f"{path} was saved by a run on other data (its {', '.join(differing)} differ: "
                        f"{', '.join(f'{saved.get(name)} then, {current[name]} now' for name in differing[:2])}); "
                        "resume with the same data, or start without --resume")


def read_train_state(path, args, data=None):
    """The training state at `path`, refused (UserError) when it belongs to another experiment, or, when
    `data` (the run's data identity) is given, to other data or another run's files."""
    state = read_saved(path, "training state", "nothing to resume (it is written after every epoch); start without "
                       "--resume", "start without --resume")
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise UserError(f"{path} is not a training state written by this tool; start without --resume")
    check_content(path, state)
    if isinstance(state.get("network"), dict):
        require_finite(state["network"], path, "it comes from a diverged training; start without --resume")
    saved = state["args"]
    for flag in IDENTITY_FLAGS:
        if flag in saved and saved[flag] != args.get(flag, saved[flag]):
            raise UserError(f"{path} was saved by a run with --{flag} {saved[flag]}, this run has "
                            f"--{flag} {args[flag]}; resume with the same --{flag} or start without --resume")
    check_same_data(path, state.get("data"), data)
    changed = [f"--{flag} {args[flag]} (saved run: {saved[flag]})" for flag in RECIPE_FLAGS
               if flag in saved and flag in args and saved[flag] != args[flag]]
    return state, changed
