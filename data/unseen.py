"""Retrieval of unseen classes (`--unseen_classes`, docs/METHOD.md §13): some classes are held out of training.

The training split keeps only the items that hold at least one seen class and no unseen one, and its labels are
cut to the seen columns, so the loss (its proxies, centres, clusters) knows the seen classes only. The query set
and the database are left whole: an unseen class's training images stay in the database where the dataset's
database is its training set (digits, VOC), as DSH_Analysis puts them into its unseen-class database.
"""
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Subset

from utils.errors import UserError

from .base import RetrievalSplits, split_labels

UNSEEN_STREAM = 13  # the seed stream of the class draw, apart from the datasets' and the validation split's
FLAG = "--unseen_classes"


class ClassSplit(NamedTuple):
    """The seen and the unseen class indices, each sorted; together every class once."""
    seen: tuple
    unseen: tuple

    def as_record(self, class_names=()):
        """What the run log and .metrics.json keep, and what --test reads back (from_record)."""
        record = {"seen": list(self.seen), "unseen": list(self.unseen)}
        if class_names:
            record["unseen_names"] = [class_names[index] for index in self.unseen]
        return record

    @classmethod
    def from_record(cls, record, num_classes):
        """The ClassSplit a run log recorded; ValueError when it does not fit `num_classes` classes."""
        try:
            seen, unseen = (tuple(int(index) for index in record[part]) for part in ("seen", "unseen"))
        except (KeyError, TypeError, ValueError):
            raise ValueError("its record of the unseen classes is malformed") from None
        if sorted(seen + unseen) != list(range(num_classes)) or not seen or not unseen:
            raise ValueError(f"its seen and unseen classes do not split the dataset's {num_classes} classes")
        return cls(seen, unseen)


def _tokens(values, class_names=()):
    """The flag's words, split further at commas: ["3,7", "9"] -> ["3", "7", "9"]; a word that is a class name as
    a whole stays one ("Ankle boot")."""
    if isinstance(values, (str, int, float)):  # one value, as a recipe file may give it
        values = [values]
    return [token for value in map(str, values)
            for token in ([value] if value in class_names else value.replace(",", " ").split())]


def _fraction(tokens):
    """The fraction F of a single token 0 < F < 1, else None (a class name or index)."""
    if len(tokens) != 1 or "." not in tokens[0]:
        return None
    try:
        value = float(tokens[0])
    except ValueError:
        return None
    if not 0 < value < 1:
        raise UserError(f"{FLAG} {tokens[0]}: a fraction of the classes must lie strictly between 0 and 1")
    return value


def _class_index(token, num_classes, class_names):
    """The index of a class named `token` (a name first, else an index); UserError for neither."""
    if token in class_names:
        return class_names.index(token)
    if token.lstrip("-").isdigit() and 0 <= int(token) < num_classes:
        return int(token)
    names = f" or one of {', '.join(class_names)}" if class_names else ""
    raise UserError(f"{FLAG}: no class {token!r} in this dataset; give an index from 0 to {num_classes - 1}{names}")


def drawn_classes(fraction, num_classes, seed):
    """round(fraction * C) classes (at least 1, at most C - 1) drawn with `seed`, sorted."""
    count = min(max(1, round(fraction * num_classes)), num_classes - 1)
    order = np.random.default_rng([seed, UNSEEN_STREAM]).permutation(num_classes)
    return sorted(int(index) for index in order[:count])


def resolve_unseen_classes(values, num_classes, class_names=(), seed=0):
    """The ClassSplit of the flag's value: one fraction F (0 < F < 1; the classes drawn with `seed`) or class
    names or indices. UserError naming the flag for an unknown class, no class or every class unseen."""
    tokens = _tokens(values, tuple(class_names))
    if not tokens:
        raise UserError(f"{FLAG}: give a fraction such as 0.25 or class names or indices")
    if num_classes < 2:
        raise UserError(f"{FLAG}: the dataset has {num_classes} class; unseen classes need at least 2")
    fraction = _fraction(tokens)
    if fraction is not None:
        unseen = drawn_classes(fraction, num_classes, seed)
    else:
        unseen = sorted({_class_index(token, num_classes, tuple(class_names)) for token in tokens})
    if len(unseen) == num_classes:
        raise UserError(f"{FLAG}: all {num_classes} classes would be unseen; training needs at least one seen class")
    return ClassSplit(tuple(index for index in range(num_classes) if index not in unseen), tuple(unseen))


class SeenClassesOnly(Subset):
    """The training items that hold a seen class and no unseen one, their labels cut to the seen columns. A
    Subset, so code that follows Subsets to the images (fingerprints, truncated files) sees the same images."""

    def __init__(self, dataset, indices, seen):
        super().__init__(dataset, indices)
        self.seen = torch.as_tensor(seen, dtype=torch.long)

    def __getitem__(self, index):
        image, label, *rest = super().__getitem__(index)
        return (image, label[self.seen], *rest)

    def __getitems__(self, indices):
        return [(image, label[self.seen], *rest) for image, label, *rest in super().__getitems__(indices)]


def seen_only_indices(labels, class_split):
    """Positions of the rows of (N, C) `labels` holding a seen class and no unseen one."""
    labels = labels > 0
    unseen, seen = list(class_split.unseen), list(class_split.seen)
    return torch.nonzero(labels[:, seen].any(dim=1) & ~labels[:, unseen].any(dim=1)).flatten().tolist()


def check_unseen_coverage(splits, class_split, class_names=()):
    """UserError unless every unseen class has at least one query and one database item."""
    for part in ("query", "database"):
        held = (split_labels(getattr(splits, part)) > 0).any(dim=0)
        missing = [index for index in class_split.unseen if not held[index]]
        if missing:
            named = ", ".join(class_names[index] if class_names else str(index) for index in missing)
            raise UserError(f"{FLAG}: unseen class {named} has no {part} item, so its retrieval cannot be scored; "
                            "choose other classes (or a larger --subset)")


def apply_class_split(splits, class_split, class_names=()):
    """The RetrievalSplits with the training split reduced to the seen classes (SeenClassesOnly); query and
    database unchanged. UserError when no training item is left or an unseen class cannot be scored."""
    check_unseen_coverage(splits, class_split, class_names)
    kept = seen_only_indices(split_labels(splits.train), class_split)
    if len(kept) < 2:
        raise UserError(f"{FLAG}: {len(kept)} training item(s) hold only seen classes; hold out fewer classes")
    return RetrievalSplits(SeenClassesOnly(splits.train, kept, class_split.seen), splits.query, splits.database)
