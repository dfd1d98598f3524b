"""Images given on the command line (--query), preprocessed exactly as the database they are searched
against, and names for database items in search results."""
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset

from utils.errors import UserError

from .files import read_rgb
from .transforms import BatchTransform, image_transform


def unwrap_subset(dataset):
    """(underlying dataset, positions in it of the items of `dataset`, or None when it is not a Subset)."""
    if isinstance(dataset, Subset):
        return dataset.dataset, list(dataset.indices)
    return dataset, None


def read_query_image(path):
    """The RGB image at `path`; UserError when there is none, UnreadableImage when it is no image (a folder, a
    FIFO or a device is refused unopened)."""
    if not os.path.lexists(path):
        raise UserError(f"no query image at {path}")
    return read_rgb(path, what="query image", hint="pass a PNG or JPEG image")


def query_batch(paths, database, preprocessing):
    """Float (B, 3, S, S) batch of the images at `paths`, preprocessed with the database's own eval
    transform: a BatchTransform (in-memory datasets) gets a uint8 tensor, any other transform the PIL
    image; a dataset without one gets the paper's eval recipe (resize, ImageNet normalisation)."""
    transform = getattr(unwrap_subset(database)[0], "transform", None)
    images = []
    for path in paths:
        image = read_query_image(path)
        if isinstance(transform, BatchTransform):
            pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
            images.append(transform(pixels[None])[0])
        else:
            images.append((transform or image_transform(preprocessing, train=False))(image))
    return torch.stack(images)


def item_names(database):
    """name(i) for database item i: its file path when the dataset lists `.paths`, else 'database #i'."""
    base, positions = unwrap_subset(database)
    paths = getattr(base, "paths", None)
    if paths is None:
        return lambda index: f"database #{index}"
    return lambda index: str(paths[positions[index] if positions is not None else index])


def raw_image(dataset, index):
    """Item `index` of a split as an RGB PIL image before any transform (for a person to look at): the
    image file of a file dataset, the uint8 pixels of an in-memory one."""
    base, positions = unwrap_subset(dataset)
    position = positions[index] if positions is not None else index
    if getattr(base, "images", None) is not None:
        return Image.fromarray(base.images[position].permute(1, 2, 0).numpy())
    return read_rgb(base.paths[position], what="image")
