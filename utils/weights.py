"""A backbone's pretrained weights as a state dict, from a file given with --weights or from its hub.

- torchvision backbones: torchvision's own loading from the torch hub cache ($TORCH_HOME/hub/checkpoints,
  ~/.cache/torch/hub/checkpoints by default), which downloads the file there when it is missing.
- timm backbones: timm's loading from the Hugging Face hub (its cache: $HF_HOME, ~/.cache/huggingface),
  which downloads the file there when it is missing.
- --weights FILE: a .safetensors file (safetensors' own format) or a state dict saved by torch.save,
  read with weights_only=True.
Offline and not cached: one message naming the file and where to put it. Files follow the reader rule
(utils/paths.py): a FIFO or a device is refused before it is opened.
"""
import os
import pickle
import urllib.error
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch

from .checkpoint import read_state_dict, require_finite
from .errors import UserError
from .paths import require_regular_file


def read_weights_file(path):
    """The state dict in the --weights file `path` (.safetensors, or torch.save's format)."""
    path = require_regular_file(path, "--weights", missing="check --weights, or drop it to load the weights from "
                                "the backbone's hub")
    if path.suffix != ".safetensors":
        return read_state_dict(path, what="weights file", missing="check --weights",
                               unreadable="point --weights to a good copy")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read weights file {path} ({str(exc).splitlines()[0][:200]}): the file is truncated, "
                        "corrupt or not a safetensors file; point --weights to a good copy") from None
    require_finite(state, f"weights file {path}", "it is damaged; point --weights to a good copy")
    return state


def hub_cache_file(weights):
    """Where torchvision keeps a weights enum member's file in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def torchvision_state_dict(weights, backbone, show_progress=True):
    """(state_dict, path) of a torchvision weights enum member, from the torch hub cache (downloaded if missing)."""
    path = hub_cache_file(weights)
    downloading = not path.exists()
    try:
        return weights.get_state_dict(progress=show_progress, check_hash=True, weights_only=True), path
    except (urllib.error.URLError, OSError, RuntimeError, pickle.UnpicklingError, EOFError,
            zipfile.BadZipFile) as exc:
        if downloading:
            raise UserError(f"cannot download the ImageNet weights of --backbone {backbone} from {weights.url} "
                            f"({getattr(exc, 'reason', exc)}); put {path.name} into {path.parent} (the torch hub "
                            "cache; set TORCH_HOME to move it), or pass --weights PATH, or train from scratch with "
                            "--no_pretrained") from None
        raise UserError(f"cannot read weights file {path} ({type(exc).__name__}): the file is truncated, corrupt or "
                        "not a PyTorch checkpoint; delete it so that it is downloaded again, or pass --weights PATH") \
            from None


def timm_state_dict(hub_id, backbone):
    """(state_dict, source) of a timm model's pretrained weights from the Hugging Face hub (or its cache)."""
    from timm.models import load_state_dict_from_hf
    try:
        return load_state_dict_from_hf(hub_id, weights_only=True), f"the Hugging Face hub ({hub_id})"
    except Exception as exc:  # huggingface_hub raises many types offline (connection, offline mode, not cached)
        raise UserError(f"cannot download the pretrained weights of --backbone {backbone} from the Hugging Face hub "
                        f"({hub_id}: {type(exc).__name__}); pass --weights FILE (a .safetensors file or a state dict "
                        "of that model), or put them into the Hugging Face cache (HF_HOME), or train from scratch "
                        "with --no_pretrained") from None


def pretrained_state_dict(spec, local_file=None, show_progress=True):
    """(state_dict, where it came from) of BackboneSpec `spec`'s pretrained weights: `local_file`
    (--weights) when given, else the backbone's hub."""
    if local_file is not None:
        return read_weights_file(local_file), Path(local_file)
    if spec.hub_id is not None:
        return timm_state_dict(spec.hub_id, spec.name)
    return torchvision_state_dict(spec.imagenet_weights, spec.name, show_progress)
