"""The embedded offline dataset: multi-label 2x2 mosaics of scikit-learn's handwritten digits.

scikit-learn ships 1,797 real 8x8 digit scans (10 classes), so this needs no download. A mosaic holds
1-3 digits of distinct classes in random cells of a 2x2 grid, upscaled to 32x32 and repeated over three
channels; its label is the multi-hot set of those classes. The source digits are split per class into
two disjoint pools: queries are built from one, train/database mosaics from the other, so a query
never reuses a scan seen in training. The database is the training set, as in VOC2007's protocol.
Everything is a function of the seed.

Long-tailed variant (`imbalance` rho > 1, docs/METHOD.md §9.1): class c (digit c) may appear in at most
n_c = round(n_max * rho^(-c / (C - 1))) training mosaics, n_max being a class's share of the balanced set;
the training set (= database) is drawn from a larger pool, tail classes first, and the queries stay balanced.
"""
from functools import lru_cache

import numpy as np

from utils.errors import UserError

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


def class_budgets(imbalance, head_count, num_classes=NUM_CLASSES):
    """n_c = round(head_count * imbalance^(-c / (C - 1))): exponentially decaying from class 0 to class C - 1."""
    return np.round(head_count * float(imbalance) ** (-np.arange(num_classes) / (num_classes - 1))).astype(np.int64)


def long_tailed_selection(labels, budgets, rng):
    """Sorted indices of the rows of (N, C) `labels` kept so that class c is in at most budgets[c] of them.

    Tail first: rows are offered in order of their rarest class (highest index) descending, ties in random
    order, and a row is kept when every one of its classes still has room, so the scarce tail rows are
    taken before head-only rows fill the head budgets.
    """
    positive = labels > 0
    rarest = np.where(positive, np.arange(labels.shape[1]), -1).max(axis=1)
    order = np.lexsort((rng.random(len(labels)), -rarest))
    room, kept = budgets.copy(), []
    for row in order:
        classes = np.flatnonzero(positive[row])
        if (room[classes] > 0).all():
            room[classes] -= 1
            kept.append(row)
    return np.sort(np.asarray(kept, dtype=np.int64))


def refuse_starved_classes(imbalance, counts, head_count):
    """A class without a training mosaic has no database item either (database = training set): its queries
    could never find anything, and the tail bucket would be measured on nothing. Refused, with the bound."""
    starved = np.flatnonzero(np.asarray(counts) < 1)
    if len(starved):
        raise UserError(f"--imbalance {imbalance:g} leaves class{'es' if len(starved) > 1 else ''} "
                        f"{', '.join(map(str, starved))} without a training (and database) mosaic: the rarest class "
                        f"gets round({head_count} / rho) mosaics, so --imbalance must be below {2 * head_count}")


LONG_TAIL_POOL_FACTOR = 5  # pool of mosaics the long-tailed training set is drawn from, x TRAIN_SIZE


def generate(seed, train_size=TRAIN_SIZE, query_size=QUERY_SIZE, imbalance=1.0):
    """(train_images, train_labels, query_images, query_labels), deterministic in `seed`; imbalance > 1
    draws a long-tailed training set (class_budgets with the balanced set's mean class count as n_max)."""
    images, targets = load_source_digits()
    pools_rng, train_rng, query_rng, tail_rng = (np.random.default_rng([seed, stream]) for stream in range(4))
    train_pool, query_pool = split_pools(targets, pools_rng)
    if imbalance == 1:
        train = make_mosaics(images, targets, train_pool, train_size, train_rng)
    else:
        head_count = int(round(train_size * (MAX_DIGITS + 1) / 2 / NUM_CLASSES))  # 1-3 digits: 2 per mosaic
        budgets = class_budgets(imbalance, head_count)
        refuse_starved_classes(imbalance, budgets, head_count)
        pool_images, pool_labels = make_mosaics(images, targets, train_pool, LONG_TAIL_POOL_FACTOR * train_size,
                                                train_rng)
        kept = long_tailed_selection(pool_labels, budgets, tail_rng)
        refuse_starved_classes(imbalance, pool_labels[kept].sum(axis=0), head_count)
        train = pool_images[kept], pool_labels[kept]
    query = make_mosaics(images, targets, query_pool, query_size, query_rng)
    return (*train, *query)


def build(root, seed, preprocessing, options=None):
    del root  # nothing on disk: the source digits come with scikit-learn, and stay in memory
    imbalance = options.imbalance if options is not None else 1.0
    if imbalance < 1:
        raise UserError(f"--imbalance {imbalance:g}: the ratio of the commonest to the rarest class must be >= 1")
    train_images, train_labels, query_images, query_labels = generate(seed, imbalance=imbalance)
    # Mirrored digits are other glyphs, so no flip augmentation here.
    train_transform = BatchTransform(preprocessing, train=True, hflip=False)
    eval_transform = BatchTransform(preprocessing, train=False)
    return RetrievalSplits(
        train=ArrayImageDataset(train_images, train_labels, train_transform),
        query=ArrayImageDataset(query_images, query_labels, eval_transform),
        database=ArrayImageDataset(train_images, train_labels, eval_transform))


SPEC = DatasetSpec(
    name="digits", num_classes=NUM_CLASSES, default_topk=0, build=build, in_memory=True,
    class_names=tuple(str(digit) for digit in range(NUM_CLASSES)), options=("imbalance",),
    summary="embedded: 2x2 mosaics of 1-3 scikit-learn digits; 4,000 train = database, 500 queries")
