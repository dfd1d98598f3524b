"""The opt-in image cache (--cache): each image of a dataset decoded once, resized to the network's
input size, into one uint8 (N, 3, S, S) .npy file that later epochs and runs memory-map.

Lazy loading decodes a JPEG every time an image is used; the cache pays that once, then reads
3*S*S bytes per image (150 KB at 224, 600 KB at 448) from a file the operating system keeps in its
page cache when memory allows. The file name carries a digest of the image list, so a changed list
builds a new cache instead of reading the wrong rows; the file is written under a temporary name and
renamed when complete, so an interrupted build leaves nothing that a later run could mistake for a cache.
"""
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.errors import UserError
from utils.runlog import progress_bar
from utils.reproducibility import loader_generator

DECODE_BATCH = 32


def cache_file_for(cache_dir, name, paths, input_size):
    """{cache_dir}/{name}_{S}px_{digest of the image list relative to cache_dir}.npy"""
    cache_dir = Path(cache_dir)
    listing = "\n".join(os.path.relpath(path, cache_dir) for path in paths)
    digest = hashlib.sha1(listing.encode()).hexdigest()[:12]
    return cache_dir / f"{name}_{input_size}px_{digest}.npy"


def decode_workers():
    return min(8, os.cpu_count() or 1)


def decoding_loader(dataset, batch_size=DECODE_BATCH, collate_fn=None):
    """A DataLoader that decodes `dataset` once in worker processes, in order.

    It has its own generator: a DataLoader draws its workers' seed from the global RNG otherwise, and a
    run that decodes ahead of training (building the cache, checking images) would then initialise the
    network unlike a run that does not.
    """
    return DataLoader(dataset, batch_size=batch_size, num_workers=decode_workers(), collate_fn=collate_fn,
                      generator=loader_generator(0))


class ImageCache:
    """Rows of a cache file, one per path; the file is memory-mapped on first access in each process."""

    def __init__(self, file, paths, input_size):
        self.file = Path(file)
        self.input_size = input_size
        self.row_of = {path: row for row, path in enumerate(paths)}
        self._array = None

    @classmethod
    def open_or_build(cls, cache_dir, name, decoder, input_size):
        """The cache of decoder.paths at input_size, built from `decoder` (items: uint8 (3, S, S)
        images) unless a complete cache of the same image list exists."""
        file = cache_file_for(cache_dir, name, decoder.paths, input_size)
        cache = cls(file, decoder.paths, input_size)
        if file.exists():
            try:
                cache.check_shape()
                return cache
            except (UserError, ValueError, OSError, EOFError) as exc:  # damaged, truncated or replaced
                print(f"note: the image cache {file} is unusable ({exc}); building it again", file=sys.stderr)
                cache._array = None
                file.unlink()
        cache.build(decoder)
        cache.check_shape()
        return cache

    @property
    def array(self):
        if self._array is None:
            self._array = np.load(self.file, mmap_mode="r")
        return self._array

    def __getstate__(self):
        # Worker processes started by spawn map the file themselves instead of receiving a copy.
        return {**self.__dict__, "_array": None}

    def rows(self, paths):
        return np.array([self.row_of[path] for path in paths], dtype=np.int64)

    def check_shape(self):
        expected = (len(self.row_of), 3, self.input_size, self.input_size)
        if self.array.shape != expected or self.array.dtype != np.uint8:
            raise UserError(f"image cache {self.file} holds {self.array.dtype} {self.array.shape}, expected uint8 "
                            f"{expected}")

    def build(self, decoder):
        count, side = len(decoder), self.input_size
        needed = count * 3 * side * side
        self.file.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.file.parent).free
        if needed > free:
            raise UserError(f"--cache needs {tqdm.format_sizeof(needed, 'B')} for {count} images at {side}x{side} "
                            f"in {self.file.parent}, which has {tqdm.format_sizeof(free, 'B')} free; free space or "
                            "drop --cache")
        started = time.perf_counter()
        handle, partial = tempfile.mkstemp(dir=self.file.parent, prefix=f".{self.file.name}.", suffix=".partial")
        os.close(handle)
        try:
            array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(count, 3, side, side))
            loader = decoding_loader(decoder)
            row = 0
            with progress_bar(total=count, desc=f"caching images at {side}x{side}", unit="img", leave=True) as bar:
                for images, _ in loader:
                    array[row:row + len(images)] = images.numpy()
                    row += len(images)
                    bar.update(len(images))
            array.flush()
            del array
            os.replace(partial, self.file)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        print(f"cached {count:,} images at {side}x{side} in {self.file} ({tqdm.format_sizeof(needed, 'B')}) "
              f"in {time.perf_counter() - started:.1f}s")


class CachedImageDataset(Dataset):
    """A split read from an ImageCache; `transform` is a BatchTransform (flip, normalise).

    Images are transformed one at a time: in a DataLoader worker (one thread) that keeps each pass over
    the pixels within the CPU cache, twice as fast as passes over a whole 100 x 3 x 448 x 448 batch.
    """

    def __init__(self, cache, paths, labels, transform):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} images but {len(labels)} label rows")
        self.cache = cache
        self.paths = [str(path) for path in paths]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
        self.rows = cache.rows(self.paths)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = torch.from_numpy(np.array(self.cache.array[self.rows[index]]))
        return self.transform(image[None])[0], self.labels[index]
