"""Where a backbone's ImageNet weights come from: a file given with --weights, else torchvision's file
in the torch hub cache ($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints by default), else a
download into that cache. Offline and not cached: one message naming the file and the folder."""
import os
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch

from .checkpoint import read_state_dict
from .errors import UserError


def hub_checkpoint_dir():
    return Path(torch.hub.get_dir()) / "checkpoints"


def official_file(weights):
    """The torch hub cache path of a torchvision weights enum member (where torchvision itself looks)."""
    return hub_checkpoint_dir() / os.path.basename(urlparse(weights.url).path)


def download_weights(weights, path, backbone):
    hash_match = torch.hub.HASH_REGEX.search(path.name)  # torchvision names files name-<sha256 prefix>.pth
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), hash_match.group(1) if hash_match else None)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise UserError(f"cannot download the ImageNet weights of --backbone {backbone} from {weights.url} "
                        f"({getattr(exc, 'reason', exc)}); put {path.name} into {path.parent} (the torch hub cache; "
                        "set TORCH_HOME to move it), or pass --weights PATH, or train from scratch with "
                        "--no_pretrained") from None


def imagenet_state_dict(weights, backbone, local_file=None):
    """(state_dict, path it was read from) of a backbone's torchvision ImageNet weights."""
    if local_file is not None:
        path = Path(local_file)
        return read_state_dict(path, what="weights file",
                               missing="check --weights, or drop it to use torchvision's file from the torch hub cache",
                               unreadable="point --weights to a good copy"), path
    path = official_file(weights)
    if not path.exists():
        download_weights(weights, path, backbone)
    return read_state_dict(path, what="weights file", missing="rerun to download it",
                           unreadable="delete it so that it is downloaded again, or pass --weights PATH"), path
