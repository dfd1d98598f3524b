"""Network checkpoints in the paper code's format: the plain state_dict of the network, saved as
result/{dataset}_{backbone}_{bits}.ckpt. Written atomically, read with weights_only=True."""
import pickle
import zipfile

import torch

from .atomic import atomic_write
from .errors import UserError


def save_state_dict(module, path):
    state = {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f), binary=True)


def read_state_dict(path, what="checkpoint",
                    missing="train first (the same command without --test) or pass --checkpoint PATH",
                    unreadable="retrain or point --checkpoint to a good copy"):
    """The state_dict stored at `path`, with a UserError for a missing or unreadable file; `what` names
    the kind of file and `missing`/`unreadable` say what to do, in the messages."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no {what} at {path}: {missing}") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {what} {path} ({type(exc).__name__}): the file is truncated, "
                        f"corrupt or not a PyTorch checkpoint; {unreadable}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a network state_dict")
    return state


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
