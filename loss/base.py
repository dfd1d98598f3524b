"""What every loss shares: the Hyperparameter declaration, the HashingLoss base class (and the base of
losses with seeded fixed targets), and the batch-level helpers several families use.

Each loss declares its tunable hyper-parameters in HYPERPARAMETERS (name, published default, help), in
the style of pytorch-metric-learning; the constructor takes them as keyword arguments and stores each
as an attribute of the same name. Two values come from the run instead: the code-table threshold zeta
(losses with `uses_zeta`) and the seed of fixed random targets (losses with `uses_seed`).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Hyperparameter:
    """A tunable hyper-parameter: attribute name, published default (its type is the value's type), a
    one-line description, and the command-line flag when it is not `{loss}_{name}`."""
    name: str
    default: float
    help: str
    flag: str = None

    def dest(self, owner):
        """The flag's name without dashes: its own flag, else {owner}_{name} (owner: the loss or scheme)."""
        return self.flag or f"{owner}_{self.name}"


def cosine_matrix(a, b):
    """(len(a), len(b)) cosine similarities; zero vectors give 0, not NaN."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def shares_label(labels):
    """(B, B) bool: samples i and k share at least one label."""
    positive = (labels > 0).float()
    return (positive @ positive.T) > 0


def distinct_pairs(batch_size, device):
    """(B, B) bool mask of the pairs (i, k) with i != k: a sample's pair with itself carries no information."""
    return ~torch.eye(batch_size, dtype=torch.bool, device=device)


def masked_mean(values, mask):
    """Mean of `values` where `mask` holds; 0 (with a zero gradient) when the mask is empty."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


class HashingLoss(nn.Module):
    """Base of every loss: remembers (num_classes, hash_bit) and sets the declared hyper-parameters."""

    name = None  # the --loss name of a registered loss
    HYPERPARAMETERS = ()
    uses_zeta = False  # the threshold zeta of the code table (hashing/codetable.py)
    uses_seed = False  # fixed random targets drawn from the run's seed

    def __init__(self, num_classes, hash_bit, **hyperparameters):
        super().__init__()
        self.num_classes = num_classes
        self.hash_bit = hash_bit
        unknown = set(hyperparameters) - {spec.name for spec in self.HYPERPARAMETERS}
        if unknown:
            raise TypeError(f"{type(self).__name__} has no hyper-parameter {', '.join(sorted(unknown))}")
        for spec in self.HYPERPARAMETERS:
            setattr(self, spec.name, type(spec.default)(hyperparameters.get(spec.name, spec.default)))

    def hyperparameters(self):
        """The effective hyper-parameters of this instance (what a run log records), zeta and seed included."""
        names = [spec.name for spec in self.HYPERPARAMETERS]
        names += ["zeta"] * self.uses_zeta + ["seed"] * self.uses_seed
        return {name: getattr(self, name) for name in names}

    def extra_repr(self):
        settings = ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                             for name, value in self.hyperparameters().items())
        return f"num_classes={self.num_classes}, hash_bit={self.hash_bit}, {settings}".rstrip(", ")


class SeededTargetsLoss(HashingLoss):
    """A loss with fixed random targets (hash centres, a codebook) drawn from `seed`."""

    uses_seed = True

    def __init__(self, num_classes, hash_bit, seed=0, **hyperparameters):
        super().__init__(num_classes, hash_bit, **hyperparameters)
        self.seed = int(seed)

    def generator(self):
        return torch.Generator().manual_seed(self.seed)
