"""The embedded offline dataset: multi-label 2x2 mosaics of scikit-learn's handwritten digits.

scikit-learn ships 1,797 real 8x8 digit scans (10 classes), so this needs no download. A mosaic holds
1-3 digits of distinct classes in random cells of a 2x2 grid, upscaled to 32x32 and repeated over three
channels; its label is the multi-hot set of those classes. The source digits are split per class into
two disjoint pools: queries are built from one, train/database mosaics from the other, so a query
never reuses a scan seen in training. The database is the training set, as in VOC2007's protocol.
Everything is a function of the seed.
"""
from functools import lru_cache

import numpy as np

from .base import ArrayImageDataset, DatasetSpec, RetrievalSplits
from .transforms import BatchTransform

NUM_CLASSES = 10
TRAIN_SIZE = 4000
QUERY_SIZE = 500
QUERY_POOL_FRACTION = 0.2
MAX_DIGITS = 3
CELL = 8      # side of a source digit
SCALE = 2     # mosaic side 2 * CELL = 16, upscaled to 32


@lru_cache(maxsize=1)
def load_source_digits():
    """scikit-learn's digits as uint8 (N, 8, 8) images in 0..255 and their class indices (read-only)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    targets = digits.target.astype(np.int64)
    images.flags.writeable = targets.flags.writeable = False  # shared by every caller through the cache
    return images, targets


def split_pools(targets, rng, query_fraction=QUERY_POOL_FRACTION):
    """Disjoint (train_pool, query_pool) index arrays with the same class proportions."""
    train_pool, query_pool = [], []
    for cls in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(targets == cls))
        cut = int(round(len(members) * query_fraction))
        query_pool.append(members[:cut])
        train_pool.append(members[cut:])
    return np.sort(np.concatenate(train_pool)), np.sort(np.concatenate(query_pool))


def make_mosaics(images, targets, pool, count, rng):
    """`count` mosaics from the digits in `pool`: uint8 (count, 3, 32, 32) and (count, 10) labels."""
    pool_targets = targets[pool]
    by_class = pool[np.argsort(pool_targets, kind="stable")]
    class_count = np.bincount(pool_targets, minlength=NUM_CLASSES)
    class_start = np.cumsum(class_count) - class_count

    num_digits = rng.integers(1, MAX_DIGITS + 1, size=count)
    classes = np.argsort(rng.random((count, NUM_CLASSES)), axis=1)[:, :MAX_DIGITS]
    cells = np.argsort(rng.random((count, 4)), axis=1)[:, :MAX_DIGITS]
    pick = class_start[classes] + (rng.random((count, MAX_DIGITS)) * class_count[classes]).astype(np.int64)
    used = np.arange(MAX_DIGITS)[None, :] < num_digits[:, None]

    grid = np.zeros((count, 4, CELL, CELL), dtype=np.uint8)
    rows, slots = np.nonzero(used)
    grid[rows, cells[rows, slots]] = images[by_class[pick[rows, slots]]]
    mosaics = grid.reshape(count, 2, 2, CELL, CELL).transpose(0, 1, 3, 2, 4).reshape(count, 2 * CELL, 2 * CELL)
    mosaics = mosaics.repeat(SCALE, axis=1).repeat(SCALE, axis=2)

    labels = np.zeros((count, NUM_CLASSES), dtype=np.float32)
    labels[rows, classes[rows, slots]] = 1
    return np.repeat(mosaics[:, None], 3, axis=1), labels


def generate(seed, train_size=TRAIN_SIZE, query_size=QUERY_SIZE):
    """(train_images, train_labels, query_images, query_labels), deterministic in `seed`."""
    images, targets = load_source_digits()
    pools_rng, train_rng, query_rng = (np.random.default_rng([seed, stream]) for stream in range(3))
    train_pool, query_pool = split_pools(targets, pools_rng)
    train = make_mosaics(images, targets, train_pool, train_size, train_rng)
    query = make_mosaics(images, targets, query_pool, query_size, query_rng)
    return (*train, *query)


def build(root, seed, input_size, options=None):
    del root, options  # nothing on disk: the source digits come with scikit-learn, and stay in memory
    train_images, train_labels, query_images, query_labels = generate(seed)
    # Mirrored digits are other glyphs, so no flip augmentation here.
    train_transform = BatchTransform(input_size, train=True, hflip=False)
    eval_transform = BatchTransform(input_size, train=False)
    return RetrievalSplits(
        train=ArrayImageDataset(train_images, train_labels, train_transform),
        query=ArrayImageDataset(query_images, query_labels, eval_transform),
        database=ArrayImageDataset(train_images, train_labels, eval_transform))


SPEC = DatasetSpec(
    name="digits", num_classes=NUM_CLASSES, default_topk=0, build=build, in_memory=True,
    summary="embedded: 2x2 mosaics of 1-3 scikit-learn digits; 4,000 train = database, 500 queries")
