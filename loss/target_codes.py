"""Losses towards fixed target codes drawn from the run's seed: CSQ's hash centres and OrthoHash's
codebook (docs/METHOD.md §6.6, §6.8)."""
import numpy as np
import torch
import torch.nn.functional as F

from hashing.hadamard import hadamard_matrix

from .base import Hyperparameter, SeededTargetsLoss, cosine_matrix, masked_mean


def random_signs(shape, generator):
    """+-1 float tensor with independent fair signs from `generator`."""
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def min_pairwise_distance(centres):
    """The smallest Hamming distance between two rows of a +-1 matrix (n + 1 for fewer than two rows)."""
    if len(centres) < 2:
        return centres.shape[1] + 1
    rows = centres.numpy()  # NumPy: a tiny product, where torch's thread pool costs more than the arithmetic
    distances = (rows.shape[1] - rows @ rows.T) / 2
    return int(distances[~np.eye(len(rows), dtype=bool)].min())


def distinct_bernoulli_rows(count, hash_bit, taken, generator):
    """`count` random +-1 rows (each bit +1 with probability 1/2), distinct from each other and from `taken`:
    rows equal to an earlier one are dropped and drawn again."""
    seen, rows = {tuple(row) for row in taken.tolist()}, []
    while len(rows) < count:  # ends: the caller ensures 2^n >= len(taken) + count
        block = torch.where(torch.rand(2 * count, hash_bit, generator=generator) < 0.5, -1.0, 1.0)
        for row in map(tuple, block.tolist()):
            if len(rows) < count and row not in seen:
                seen.add(row)
                rows.append(row)
    return torch.tensor(rows, dtype=torch.float32).reshape(count, hash_bit)


def hash_centres(num_classes, hash_bit, generator, draws=50):
    """CSQ's centres (docs/METHOD.md §6.6): rows of [H; -H] for a Hadamard matrix H of order hash_bit
    while they last, then Bernoulli rows, all pairwise distinct; of `draws` draws of those rows, the one
    with the largest minimum pairwise distance is kept."""
    if num_classes > 2 ** min(hash_bit, 62):
        raise ValueError(f"{num_classes} classes need {num_classes} distinct centres, more than the "
                         f"{2 ** hash_bit} codes of {hash_bit} bits")
    hadamard = hadamard_matrix(hash_bit)
    if hadamard is None:
        fixed = torch.empty(0, hash_bit)
    else:
        rows = torch.from_numpy(hadamard).float()
        fixed = torch.cat([rows, -rows])[:num_classes]
    if len(fixed) == num_classes:
        return fixed
    best, best_distance = None, -1
    for _ in range(draws):
        centres = torch.cat([fixed, distinct_bernoulli_rows(num_classes - len(fixed), hash_bit, fixed, generator)])
        distance = min_pairwise_distance(centres)
        if distance > best_distance:
            best, best_distance = centres, distance
    return best


class CSQLoss(SeededTargetsLoss):
    """CSQ (Yuan et al., CVPR 2020): fixed hash centres; a sample's centre is sign(sum of its classes'
    centres), zeros broken by a fixed random sign vector;

      L = BCE((tanh u + 1)/2, (h + 1)/2) + quantization * mean((|tanh u| - 1)^2)
    Centres and tie vector are drawn from `seed`. (tanh u + 1)/2 = sigmoid(2u), so BCE is computed on
    the logits 2u, which stays finite when tanh saturates.
    """

    name = "csq"

    HYPERPARAMETERS = (Hyperparameter("quantization", 1e-4, "weight lambda of the quantisation term"),)

    def __init__(self, num_classes, hash_bit, seed=0, **hyperparameters):
        super().__init__(num_classes, hash_bit, seed, **hyperparameters)
        generator = self.generator()
        self.register_buffer("centres", hash_centres(num_classes, hash_bit, generator))
        self.register_buffer("tie_breaker", random_signs((hash_bit,), generator))

    def hyperparameters(self):
        """...and the smallest Hamming distance between two centres, which the run log records."""
        return {**super().hyperparameters(), "min_centre_distance": min_pairwise_distance(self.centres)}

    def target_centres(self, labels):
        summed = (labels > 0).float() @ self.centres
        return torch.where(summed == 0, self.tie_breaker, torch.sign(summed))

    def forward(self, codes, labels):
        codes = codes.float()
        targets = (self.target_centres(labels) + 1) / 2
        centre_term = F.binary_cross_entropy_with_logits(2 * codes, targets)
        return centre_term + self.quantization * (torch.tanh(codes).abs() - 1).pow(2).mean()


def bernoulli_codebook(num_classes, hash_bit, generator, attempts=100):
    """OrthoHash's codebook: fair +-1 entries, redrawn (up to `attempts` times) until the rows differ."""
    for _ in range(attempts):
        codebook = random_signs((num_classes, hash_bit), generator)
        if len(torch.unique(codebook, dim=0)) == num_classes:
            break
    return codebook


class OrthoHashLoss(SeededTargetsLoss):
    """OrthoHash (Hoe et al., NeurIPS 2021): cosine-margin softmax against a fixed +-1 codebook,

      logits_k = scale * (cos(x, c_k) - margin * y_k),  L = -sum_k (y_k / sum y) log softmax_k
    averaged over the samples with a label. The codebook is drawn from `seed`.
    """

    name = "orthohash"

    HYPERPARAMETERS = (Hyperparameter("scale", 8.0, "logit scale s"), Hyperparameter("margin", 0.2, "cosine margin m"))

    def __init__(self, num_classes, hash_bit, seed=0, **hyperparameters):
        super().__init__(num_classes, hash_bit, seed, **hyperparameters)
        self.register_buffer("codebook", bernoulli_codebook(num_classes, hash_bit, self.generator()))

    def forward(self, codes, labels):
        positive = (labels > 0).float()
        logits = self.scale * (cosine_matrix(codes.float(), self.codebook) - self.margin * positive)
        count = positive.sum(dim=1)
        per_sample = -(positive / count.clamp(min=1)[:, None] * F.log_softmax(logits, dim=1)).sum(dim=1)
        return masked_mean(per_sample, count > 0)
