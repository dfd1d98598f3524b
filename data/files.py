"""Datasets of image files: decoded lazily, one image at a time in the DataLoader workers, or read
from the opt-in uint8 cache (`--cache`, data/image_cache.py). Each dataset family module only lists
(paths, labels) per split and calls file_splits()."""
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from utils.errors import UserError
from utils.runlog import progress_bar, warn

from .base import RetrievalSplits
from .image_cache import CachedImageDataset, ImageCache, decoding_loader
from .transforms import BatchTransform, image_transform, resize_steps


class LabelledPaths(NamedTuple):
    """One split of a file dataset: image paths (str) and their (N, C) 0/1 labels."""
    paths: list
    labels: np.ndarray


class UnreadableImage(UserError):
    """An image file that cannot be decoded.

    It is usually raised in a DataLoader worker, and the DataLoader re-raises it in the main process
    as UnreadableImage(the worker's whole traceback); the user needs only its last line.
    """

    def __init__(self, message):
        if "Original Traceback" in message:
            last_line = message.rstrip().splitlines()[-1]
            message = last_line.partition(f"{type(self).__name__}: ")[2] or last_line
        super().__init__(message)


def to_rgb(image):
    """An RGB image with 8 bits a channel. 16-bit and 32-bit grey images are scaled down (65535 -> 255):
    PIL's convert("RGB") would clip every value above 255 to white."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    scale = 255.0 if image.mode == "F" and values.max(initial=0) <= 1 else 255.0 / 65535.0
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def read_rgb(path, what="image", hint="replace the file or remove its line from the split"):
    """The image at `path` as an RGB PIL image; UnreadableImage (naming `what` and the `hint`) if it
    cannot be decoded."""
    try:
        with warnings.catch_warnings():
            # Over PIL's pixel limit PIL only warns (an error from twice the limit): refuse both alike.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"cannot read {what} {path} ({exc}); {hint}") from None


def require_files(paths, listed_in, allow_missing=False):
    """Stop before training, not in the middle of an epoch, when listed images are missing (unless they
    are to be skipped with the unreadable ones, see drop_unreadable)."""
    missing = [path for path in paths if not Path(path).is_file()]
    if missing and not allow_missing:
        raise UserError(f"{len(missing)} of the {len(paths)} images listed in {listed_in} do not exist, "
                        f"e.g. {missing[0]}; check the data folder (see README, Datasets), or pass "
                        "--skip_bad_images to leave them out")


class _Readable(Dataset):
    """Whether each image decodes; iterated by DataLoader workers to check a dataset in parallel."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            read_rgb(self.paths[index])
        except UnreadableImage:
            return False
        return True


def drop_unreadable(splits):
    """--skip_bad_images: decode every image once (in DataLoader workers) and leave out the missing and
    unreadable ones, with a warning that counts them. Returns the filtered LabelledPaths, same order."""
    every_image = list(dict.fromkeys(path for split in splits for path in split.paths))
    loader = decoding_loader(_Readable(every_image), batch_size=64, collate_fn=list)
    readable = [ok for batch in progress_bar(loader, desc="checking images", unit="batch") for ok in batch]
    bad = {path for path, ok in zip(every_image, readable) if not ok}
    if bad:
        examples = ", ".join(sorted(bad)[:3])
        warn(f"--skip_bad_images left out {len(bad)} of {len(every_image)} images that are missing or cannot be "
             f"decoded (e.g. {examples})")
    kept = []
    for split in splits:
        keep = np.array([path not in bad for path in split.paths], dtype=bool)
        kept.append(LabelledPaths([path for path, ok in zip(split.paths, keep) if ok], split.labels[keep]))
    return kept


class ImageFileDataset(Dataset):
    """Images read from `paths` when an item is requested; `transform` maps a PIL image to a tensor."""

    def __init__(self, paths, labels, transform):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} images but {len(labels)} label rows")
        self.paths = [str(path) for path in paths]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(read_rgb(self.paths[index])), self.labels[index]


def file_splits(name, train, query, database, input_size, cache_dir=None, skip_unreadable=False):
    """RetrievalSplits of three LabelledPaths: decoded lazily, or, with a cache_dir, read from the image
    cache of dataset `name` there (built on first use; one cache for all splits, so each image is
    decoded once however many splits hold it). skip_unreadable: see drop_unreadable."""
    if skip_unreadable:
        train, query, database = drop_unreadable([train, query, database])
    if cache_dir is None:
        return RetrievalSplits(
            train=ImageFileDataset(*train, image_transform(input_size, train=True)),
            query=ImageFileDataset(*query, image_transform(input_size, train=False)),
            database=ImageFileDataset(*database, image_transform(input_size, train=False)))

    every_image = list(dict.fromkeys([*train.paths, *query.paths, *database.paths]))
    decoder = ImageFileDataset(every_image, np.zeros((len(every_image), 0)), v2.Compose(resize_steps(input_size)))
    cache = ImageCache.open_or_build(cache_dir, name, decoder, input_size)
    return RetrievalSplits(
        train=CachedImageDataset(cache, *train, BatchTransform(input_size, train=True)),
        query=CachedImageDataset(cache, *query, BatchTransform(input_size, train=False)),
        database=CachedImageDataset(cache, *database, BatchTransform(input_size, train=False)))
