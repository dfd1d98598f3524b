"""The opt-in image cache (--cache): each image of a dataset decoded once, resized to the network's
input size, into one uint8 (N, 3, S, S) .npy file that later epochs and runs memory-map.

Lazy loading decodes a JPEG every time an image is used; the cache pays that once, then reads
3*S*S bytes per image (150 KB at 224, 600 KB at 448) from a file the operating system keeps in its
page cache when memory allows. The file name carries a digest of the image list, so a changed list
builds a new cache instead of reading the wrong rows; the file is written under a temporary name and
renamed when complete, so an interrupted build leaves nothing that a later run could mistake for a cache.

Next to it, {cache}.truncated.json lists the images that were truncated and stored padded (written before
the cache is renamed into place, so every complete cache has one): later runs name them, and refuse them
under --strict_images instead of training on the padded pixels. The cache goes into the dataset's folder,
or into DataOptions.cache_dir (e.g. when the data root is read-only).
"""
import errno
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

from utils.atomic import write_json
from utils.documents import read_json_file
from utils.errors import UserError
from utils.paths import MiB, require_regular_file
from utils.runlog import progress_bar
from utils.reproducibility import loader_generator

from .base import UnreadableImage, name_some

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


def truncated_list_for(file):
    """The file listing a cache's truncated (padded) images, relative to the cache's folder."""
    return Path(file).with_suffix(".truncated.json")


class ImageCache:
    """Rows of a cache file, one per path; the file is memory-mapped on first access in each process.
    `truncated`: the paths whose images were truncated and are stored padded."""

    def __init__(self, file, paths, input_size):
        self.file = Path(file)
        self.input_size = input_size
        self.row_of = {path: row for row, path in enumerate(paths)}
        self.truncated = set()
        self._array = None

    @classmethod
    def open_or_build(cls, cache_dir, name, decoder, input_size, strict=False):
        """The cache of decoder.paths at input_size, built from `decoder` (items: uint8 (3, S, S)
        images) unless a complete cache of the same image list exists. `strict` (--strict_images): an
        UnreadableImage when the cache holds a truncated image padded."""
        file = cache_file_for(cache_dir, name, decoder.paths, input_size)
        cache = cls(file, decoder.paths, input_size)
        if file.exists() or file.is_symlink():
            try:
                cache.check_shape()
                cache.truncated = cache.read_truncated()
            except (UserError, ValueError, OSError, EOFError) as exc:  # damaged, truncated or replaced
                print(f"note: the image cache {file} is unusable ({exc}); building it again", file=sys.stderr)
                cache._array = None
                file.unlink()
        if cache._array is None:
            cache.build(decoder)
            cache.check_shape()
        if strict and cache.truncated:
            count = len(cache.truncated)
            raise UnreadableImage(
                f"the image cache {file} holds {count} image{'s that were' if count > 1 else ' that was'} truncated "
                f"and padded when it was built: {name_some(cache.truncated)}; --strict_images refuses them: replace "
                "the files (the cache is rebuilt when the image list changes), or drop --strict_images")
        return cache

    @property
    def array(self):
        if self._array is None:
            require_regular_file(self.file, "the image cache")  # a FIFO would block np.load
            self._array = np.load(self.file, mmap_mode="r")
        return self._array

    def read_truncated(self):
        """The truncated paths recorded when the cache was built; ValueError when the record is missing (a cache
        built before they were recorded) or is not a list of this cache's images."""
        listed = truncated_list_for(self.file)
        if not listed.is_file():
            raise ValueError(f"{listed.name} is missing")
        names = read_json_file(listed, "the list of truncated images", 64 * MiB)
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"{listed.name} is not a list of image paths")
        paths = {os.path.normpath(self.file.parent / name) for name in names}
        known = {os.path.normpath(path): path for path in self.row_of}
        if not paths <= set(known):
            raise ValueError(f"{listed.name} names images that the cache does not hold")
        return {known[path] for path in paths}

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
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=self.file.parent, prefix=f".{self.file.name}.", suffix=".partial")
        except OSError as exc:
            read_only = exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            raise UserError(f"--cache: cannot write the image cache into {self.file.parent} ({exc.strerror or exc})"
                            f"{': the data root is read-only' if read_only else ''}; put the cache in a writable "
                            "folder with --cache_dir DIR, or drop --cache") from None
        os.close(handle)
        free = shutil.disk_usage(self.file.parent).free
        if needed > free:
            Path(partial).unlink(missing_ok=True)
            raise UserError(f"--cache needs {tqdm.format_sizeof(needed, 'B')} for {count} images at {side}x{side} "
                            f"in {self.file.parent}, which has {tqdm.format_sizeof(free, 'B')} free; free space or "
                            "put the cache elsewhere with --cache_dir DIR, or drop --cache")
        started = time.perf_counter()
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
            self.truncated = set(decoder.truncated_paths())
            write_json(truncated_list_for(self.file),
                       sorted(os.path.relpath(path, self.file.parent) for path in self.truncated))
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

    def truncated_paths(self):
        """This split's images that the cache holds padded (truncated when it was built)."""
        return self.cache.truncated.intersection(self.paths)
