"""Datasets of image files: decoded lazily, one image at a time in the DataLoader workers, or read
from the opt-in uint8 cache (`--cache`, data/image_cache.py). Each dataset family module only lists
(paths, labels) per split and calls file_splits()."""
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2
from utils.errors import UserError
from utils.paths import open_regular
from utils.runlog import progress_bar, warn

from .base import DataOptions, RetrievalSplits, UnreadableImage, name_some
from .image_cache import CachedImageDataset, ImageCache, decoding_loader
from .transforms import BatchTransform, as_preprocessing, image_transform, resize_steps


class LabelledPaths(NamedTuple):
    """One split of a file dataset: image paths (str), their (N, C) 0/1 labels, and the file that lists them."""
    paths: list
    labels: np.ndarray
    source: str = ""


@contextmanager
def truncated_images_loaded():
    """PIL pads a truncated image with grey instead of failing, as the paper's code (which sets
    ImageFile.LOAD_TRUNCATED_IMAGES globally) does; only for the decode inside this block."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L")


def grey_full_scale(mode, values):
    """The value that is white in a grey image of more than 8 bits. 16-bit modes: 65535. 32-bit integer (I) and
    float (F) images say nothing of their range, so it is read from the values: within 0..1 (float only) 1,
    within 0..255 255 (8-bit values stored wider), within 0..65535 65535, beyond that their maximum."""
    if mode in SIXTEEN_BIT_GREY:
        return 65535.0
    peak = float(np.nanmax(values, initial=0))
    for full in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if peak <= full:
            return full
    return peak


def to_rgb(image):
    """An RGB image with 8 bits a channel. Grey images of more than 8 bits are scaled to 0..255 from their full
    scale (grey_full_scale): PIL's convert("RGB") would clip every value above 255 to white."""
    if image.mode not in ("I", "F") + SIXTEEN_BIT_GREY:
        return image.convert("RGB")
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    grey = np.clip(np.rint(values * (255.0 / grey_full_scale(image.mode, values))), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


# The formats the project decodes (uploads, --query, data sets): Pillow knows more, some through external programs
# (EPS runs Ghostscript), so every image is opened with only these.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
FORMATS_TEXT = "JPEG, PNG, WebP, BMP, GIF or TIFF"


class TooManyPixels(ValueError):
    """An image that declares more pixels than the caller accepts (refused before it is decoded)."""


def decode_image(source, max_pixels=None):
    """The RGB image (8 bits a channel, to_rgb) in `source`, a binary file object, decoded only from IMAGE_FORMATS:
    the one decoding function of uploads, --query and data sets. TooManyPixels when it declares more than
    `max_pixels` (checked before decoding), DecompressionBombWarning/Error over PIL's own limit,
    UnidentifiedImageError (an OSError) for another format."""
    with warnings.catch_warnings():
        # Over PIL's pixel limit PIL only warns (an error from twice the limit): refuse both alike.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source, formats=IMAGE_FORMATS) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise TooManyPixels(f"it has {image.width} x {image.height} pixels, more than {max_pixels:,}")
            return to_rgb(image)


def _open_rgb(path, what):
    # open_regular: a FIFO would block PIL's open, a device (/dev/zero) feed it without end
    with open_regular(path, what) as handle:
        return decode_image(handle)


def decode_rgb(path, strict=False, what="image", hint="replace the file or remove its line from the split"):
    """(RGB PIL image, whether it was truncated) of the file at `path`.

    A file is truncated when PIL fails to decode it strictly but decodes it with
    LOAD_TRUNCATED_IMAGES; such an image is returned padded unless `strict`. UnreadableImage (naming
    `what` and the `hint`) if it cannot be decoded at all. The strict attempt comes first, so only
    truncated files are decoded twice.
    """
    try:
        return _open_rgb(path, what), False
    except UserError as exc:  # missing, or not a regular file
        raise UnreadableImage(f"{exc}; {hint}") from None
    except UnidentifiedImageError:
        raise UnreadableImage(f"cannot read {what} {path} (not a {FORMATS_TEXT} image); {hint}") from None
    except (ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"cannot read {what} {path} ({exc}); {hint}") from None
    except OSError as exc:
        error = exc
    try:
        with truncated_images_loaded():
            image = _open_rgb(path, what)
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"cannot read {what} {path} ({exc}); {hint}") from None
    if strict:
        raise UnreadableImage(f"{what} {path} is truncated ({error}); --strict_images makes this an error: replace "
                              "the file, or drop --strict_images to load it padded as the paper's code does")
    return image, True


def read_rgb(path, what="image", hint="replace the file or remove its line from the split"):
    """The image at `path` as an RGB PIL image (a truncated one padded); UnreadableImage if it cannot be decoded."""
    return decode_rgb(path, what=what, hint=hint)[0]


def require_files(paths, listed_in, allow_missing=False):
    """Stop before training, not in the middle of an epoch, when listed images are missing (unless they
    are to be skipped with the unreadable ones, see drop_unreadable)."""
    missing = [path for path in paths if not Path(path).is_file()]
    if missing and not allow_missing:
        raise UserError(f"{len(missing)} of the {len(paths)} images listed in {listed_in} do not exist, "
                        f"e.g. {missing[0]}; check the data folder (see README, Datasets), or pass "
                        "--skip_bad_images to leave them out")


class ImageCheck(Dataset):
    """Item i: "ok", "truncated" or "unreadable: REASON" for image i; iterated by DataLoader workers
    to check a dataset in parallel."""

    def __init__(self, paths, strict=False):
        self.paths = paths
        self.strict = strict

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return "truncated" if decode_rgb(self.paths[index], self.strict)[1] else "ok"
        except UnreadableImage as exc:
            return f"unreadable: {exc}"


def check_images(paths, strict=False, desc="checking images"):
    """ImageCheck's verdict for every path, in order, decoded in DataLoader workers with a progress bar."""
    loader = decoding_loader(ImageCheck(paths, strict), batch_size=64, collate_fn=list)
    return [verdict for batch in progress_bar(loader, desc=desc, unit="batch") for verdict in batch]


def drop_unreadable(splits, strict=False):
    """--skip_bad_images: decode every image once (in DataLoader workers) and leave out the missing and
    unreadable ones, with a warning that counts them. Returns the filtered LabelledPaths, same order."""
    every_image = list(dict.fromkeys(path for split in splits for path in split.paths))
    verdicts = check_images(every_image, strict)
    bad = {path for path, verdict in zip(every_image, verdicts) if verdict.startswith("unreadable")}
    if bad:
        examples = ", ".join(sorted(bad)[:3])
        warn(f"--skip_bad_images left out {len(bad)} of {len(every_image)} images that are missing or cannot be "
             f"decoded (e.g. {examples})")
    kept = []
    for split in splits:
        keep = np.array([path not in bad for path in split.paths], dtype=bool)
        paths = [path for path, ok in zip(split.paths, keep) if ok]
        kept.append(LabelledPaths(paths, split.labels[keep], split.source))
    return kept


class ImageFileDataset(Dataset):
    """Images read from `paths` when an item is requested; `transform` maps a PIL image to a tensor.

    Truncated images are padded (an error if `strict`), and marked in `truncated`, one byte per image
    in shared memory, so that the marks set by DataLoader worker processes are seen by the main process.
    """

    def __init__(self, paths, labels, transform, strict=False):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} images but {len(labels)} label rows")
        self.paths = [str(path) for path in paths]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
        self.transform = transform
        self.strict = strict
        self.truncated = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image, truncated = decode_rgb(self.paths[index], self.strict)
        if truncated:
            self.truncated[index] = 1
        return self.transform(image), self.labels[index]

    def truncated_paths(self):
        return {self.paths[i] for i in torch.nonzero(self.truncated).flatten().tolist()}


def truncated_paths(datasets):
    """The sorted distinct image files found truncated (and padded) so far while decoding any of `datasets`
    (through Subsets), or held padded by the image cache they read: the full list for a run's log."""
    found = set()
    for dataset in datasets:
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        found |= set(dataset.truncated_paths()) if hasattr(dataset, "truncated_paths") else set()
    return sorted(found)


def truncation_note(truncated):
    """The one line a run prints when it padded truncated images ("" when there were none), naming the first few
    of `truncated` (the paths, as truncated_paths gives them; a bare count from older callers names none)."""
    count = truncated if isinstance(truncated, int) else len(truncated)
    if not count:
        return ""
    names = "" if isinstance(truncated, int) else f": {name_some(truncated)}"
    return (f"{count} truncated image{'s were' if count != 1 else ' was'} padded, as the paper's loader does "
            f"(--strict_images makes them an error){names}")


def split_problems(splits, allow_query_in_database=False):
    """What makes splits {"train", "query", "database": LabelledPaths} untrainable, one line each: an empty split,
    queries that are also training images (a query must never be trained on), and, unless allowed, queries that
    are also database images (each would find itself at rank 1). Training refuses them (file_splits); data.verify
    reports them."""
    problems = [f"the {name} split is empty ({split.source} lists no images)"
                for name, split in splits.items() if not len(split.paths)]
    trained = {os.path.normpath(path) for path in splits["train"].paths}
    both = sorted({path for path in splits["query"].paths if os.path.normpath(path) in trained})
    if both:
        problems.append(f"{len(both)} query image{'s are' if len(both) > 1 else ' is'} also training "
                        f"image{'s' if len(both) > 1 else ''} (e.g. {name_some(both, 2)}): a query must not be "
                        f"trained on; fix {splits['query'].source} or {splits['train'].source}")
    if not allow_query_in_database:
        problems += query_in_database(splits)
    return problems


def query_in_database(splits):
    """The one-line problem of a database that holds query images (an older HashNet COCO database holds all
    5,000 queries), or nothing."""
    database = {os.path.normpath(path) for path in splits["database"].paths}
    both = sorted({path for path in splits["query"].paths if os.path.normpath(path) in database})
    if not both:
        return []
    return [f"{len(both):,} query image{'s are' if len(both) > 1 else ' is'} also in the database (e.g. "
            f"{name_some(both, 3)}): each would find itself at rank 1; fix {splits['database'].source}, or pass "
            "--allow_query_in_database to reproduce such a published table knowingly"]


def file_splits(name, splits, preprocessing, cache_dir=None, options=DataOptions()):
    """RetrievalSplits of {"train", "query", "database": LabelledPaths}: decoded lazily, or, with a
    cache_dir, read from the image cache of dataset `name` there (built on first use; one cache for all
    splits, so each image is decoded once however many splits hold it). Missing files stop the run here,
    before any training, unless options.skip_bad_images leaves them out with the undecodable ones."""
    preprocessing = as_preprocessing(preprocessing)
    problems = split_problems(splits, options.allow_query_in_database)
    if problems:
        raise UserError("; ".join(problems))
    train, query, database = (splits[part] for part in ("train", "query", "database"))
    for split in (train, query, database):
        require_files(split.paths, split.source, allow_missing=options.skip_bad_images)
    if options.skip_bad_images:
        train, query, database = drop_unreadable([train, query, database], options.strict_images)
    if cache_dir is None:
        def lazy(split, train_transform=False):
            transform = image_transform(preprocessing, train=train_transform)
            return ImageFileDataset(split.paths, split.labels, transform, options.strict_images)

        return RetrievalSplits(train=lazy(train, train_transform=True), query=lazy(query), database=lazy(database))

    every_image = list(dict.fromkeys([*train.paths, *query.paths, *database.paths]))
    decoder = ImageFileDataset(every_image, np.zeros((len(every_image), 0)), v2.Compose(resize_steps(preprocessing)),
                               options.strict_images)
    # the cache holds resized pixels, so another interpolation is another cache
    cache_name = name if preprocessing.interpolation == "bilinear" else f"{name}_{preprocessing.interpolation}"
    cache = ImageCache.open_or_build(cache_dir, cache_name, decoder, preprocessing.size, options.strict_images)

    def cached(split, train_transform=False):
        return CachedImageDataset(cache, split.paths, split.labels, BatchTransform(preprocessing, train=train_transform))

    return RetrievalSplits(train=cached(train, train_transform=True), query=cached(query), database=cached(database))
