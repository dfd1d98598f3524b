"""A digest of what a split holds, for the codes cache's key (hashing/cache.py): the order and labels
of its items, and their pixels as far as they can be known without decoding them: the bytes of images
held in memory, else each image file's path, size and modification time. So an edited split file
(other labels, other images, another order) or a replaced image file gives another digest."""
import hashlib
import os

import numpy as np
from torch.utils.data import Subset


def _unwrap(dataset):
    """(the dataset under any Subset wrappers, the indices into it of the wrapped items)."""
    indices = np.arange(len(dataset))
    while isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices)[indices]
        dataset = dataset.dataset
    return dataset, indices


def split_fingerprint(dataset, file_status=True):
    """Hex SHA-256 over the items' labels and images (in-memory bytes, else path, and with `file_status`
    each file's size and mtime, which a copy of the data to another disk changes)."""
    base, indices = _unwrap(dataset)
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(base.labels.numpy()[indices]).tobytes())
    if hasattr(base, "paths"):
        for index in indices:
            path = base.paths[index]
            if not file_status:
                digest.update(f"{path}\n".encode())
                continue
            try:
                status = os.stat(path)
                digest.update(f"{path}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
    else:
        digest.update(np.ascontiguousarray(base.images.numpy()[indices]).tobytes())
    return digest.hexdigest()
