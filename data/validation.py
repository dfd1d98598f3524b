"""The validation split of `--select val` (docs/METHOD.md §10): held out from the training split only.

A seeded draw of `size` training items becomes the validation queries; the training items left over are
both what the network trains on and the database the validation queries are ranked against. So model
selection never sees the test queries, nor (for Flickr and NUS-WIDE) the test database, and a validation
query never finds itself in its own database. Both validation parts are read without augmentation: they
take the transform of the query split.
"""
import copy
from typing import NamedTuple

import numpy as np
from torch.utils.data import Dataset, Subset

VALIDATION_STREAM = 7  # the seed stream of the draw, apart from the ones the datasets use for their splits


class ValidationSplits(NamedTuple):
    """What `--select val` trains on and selects with: all three are disjoint from the test queries."""
    train: Dataset      # the training split minus the validation items (augmented as before)
    query: Dataset      # the validation items, without augmentation
    database: Dataset   # the training split minus the validation items, without augmentation


def draw_validation_indices(train_size, size, seed):
    """(validation indices, remaining training indices), both sorted, a function of `seed` only."""
    if not 0 < size < train_size:
        raise ValueError(f"a validation split of {size} items needs a training split of more than {size} "
                         f"(it has {train_size})")
    order = np.random.default_rng([seed, VALIDATION_STREAM]).permutation(train_size)
    return np.sort(order[:size]), np.sort(order[size:])


def _root(dataset):
    """(innermost dataset, index list mapping positions of `dataset` to it) through Subset wrappers."""
    indices = None
    while isinstance(dataset, Subset):
        inner = list(dataset.indices)
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def without_augmentation(dataset, like):
    """`dataset` (possibly a Subset) read with the transform of `like`'s innermost dataset."""
    root, indices = _root(dataset)
    plain = copy.copy(root)
    plain.transform = _root(like)[0].transform
    return plain if indices is None else Subset(plain, indices)


def hold_out_validation(splits, size, seed):
    """ValidationSplits of a RetrievalSplits: `size` training items drawn with `seed` (ValueError if the
    training split is too small)."""
    val_indices, rest_indices = draw_validation_indices(len(splits.train), size, seed)
    plain_train = without_augmentation(splits.train, splits.query)
    return ValidationSplits(train=Subset(splits.train, rest_indices.tolist()),
                            query=Subset(plain_train, val_indices.tolist()),
                            database=Subset(plain_train, rest_indices.tolist()))
