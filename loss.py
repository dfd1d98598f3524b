"""Hashing losses. Each is an nn.Module called as loss(codes, labels) with codes (B, n) real-valued
network outputs and labels (B, C) multi-hot; every piece of state (proxies, hash centres, codebooks,
HashNet's scale, the hierarchy's clusters) lives inside the module as a parameter or buffer, so
state_dict() round-trips it.

Multi-label convention: a label entry is positive when it is > 0, and two samples are similar when they
share a label. Formulas, sources and defaults: docs/METHOD.md §2 (HyP2), §6 (the baselines) and §6.9
(hierarchical proxies).

Each loss declares its tunable hyper-parameters in HYPERPARAMETERS (name, published default, help), in
the style of pytorch-metric-learning; the constructor takes them as keyword arguments and stores each
as an attribute of the same name. Two values come from the run instead: the code-table threshold zeta
(losses with `uses_zeta`) and the seed of fixed random targets (losses with `uses_seed`).
Pair-based losses use the pairs of distinct samples of the batch.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hashing import codetable
from hashing.hadamard import hadamard_matrix


@dataclass(frozen=True)
class Hyperparameter:
    """A tunable hyper-parameter: attribute name, published default (its type is the value's type), a
    one-line description, and the command-line flag when it is not `{loss}_{name}`."""
    name: str
    default: float
    help: str
    flag: str = None


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


def balanced_pair_weights(similar, pairs):
    """HashNet/DCH weights |S|/|S1| for similar and |S|/|S0| for dissimilar pairs among `pairs`."""
    num_pairs = pairs.sum()
    num_similar = (similar & pairs).sum()
    num_dissimilar = num_pairs - num_similar
    return torch.where(similar, num_pairs / num_similar.clamp(min=1), num_pairs / num_dissimilar.clamp(min=1))


def log_one_plus_sum_exp(logits, mask):
    """Per column j: log(1 + sum over rows i with mask[i, j] of exp(logits[i, j])), without overflow."""
    masked = torch.where(mask, logits, float("-inf"))
    zero_row = torch.zeros_like(logits[:1])
    return torch.logsumexp(torch.cat([zero_row, masked]), dim=0)


def log_cosh(values):
    """log(cosh(x)) for any x: |x| + log(1 + exp(-2|x|)) - log 2 does not overflow."""
    magnitude = values.abs()
    return magnitude + F.softplus(-2 * magnitude) - math.log(2.0)


def random_signs(shape, generator):
    """+-1 float tensor with independent fair signs from `generator`."""
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


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


class ProxyLoss(HashingLoss):
    """A loss with one learnable proxy per class, P in R^{C x n}, kaiming_normal_(mode='fan_out').

    Subclasses implement `loss_given_proxies(codes, labels, proxies, zeta)`, the proxy term for any set
    of proxies and its labels, so that hierarchical proxies can apply the same formula to coarse levels;
    `code_penalty(codes)` holds what depends on the codes alone (quantisation) and is counted once.
    Losses with `uses_zeta` take zeta=None as the code table's value for (hash_bit, num_classes).
    """

    zeta = None

    def __init__(self, num_classes, hash_bit, zeta=None, **hyperparameters):
        super().__init__(num_classes, hash_bit, **hyperparameters)
        if self.uses_zeta:
            self.zeta = codetable.zeta(hash_bit, num_classes) if zeta is None else float(zeta)
        elif zeta is not None:
            raise TypeError(f"{type(self).__name__} has no threshold zeta")
        self.proxies = nn.Parameter(torch.empty(num_classes, hash_bit))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, codes, labels):
        return self.loss_given_proxies(codes, labels, self.proxies, self.zeta) + self.code_penalty(codes)

    def loss_given_proxies(self, codes, labels, proxies, zeta):
        raise NotImplementedError

    def code_penalty(self, codes):
        return codes.new_zeros(())

    def coarse_zeta(self, num_coarse):
        """zeta of a level with `num_coarse` proxies: the code table's value for that many classes.

        Falls back to this loss's own zeta where the table has no entry (n > 256, only with --zeta).
        """
        if self.zeta is None:
            return None
        try:
            return codetable.zeta(self.hash_bit, num_coarse)
        except ValueError:
            return self.zeta


class HyP2Loss(ProxyLoss):
    """HyP2 loss (Xu et al., ACM MM 2022): learnable class proxies plus an irrelevant-pair term.

    With c_ij = cos(x_i, P_j) and threshold zeta:
      L+    = mean over label entries y_ij = 1 of (1 - c_ij)
      L-    = mean over label entries y_ij = 0 of relu(c_ij - zeta)
      Lpair = beta * mean over pairs (i, k) of samples with more than one label that share no label
              of relu(cos(x_i, x_k) - zeta); 0 when there is no such pair.
    zeta=None takes the best-known-code value for (hash_bit, num_classes); beta=0 is proxy-only.
    """

    name = "hyp2"

    HYPERPARAMETERS = (Hyperparameter("beta", 0.5, "weight of the irrelevant-pair term (0: proxy only)", flag="beta"),)
    uses_zeta = True

    def loss_given_proxies(self, codes, labels, proxies, zeta):
        codes = codes.float()
        positive = labels > 0
        unit_codes = F.normalize(codes, dim=1)
        cos = unit_codes @ F.normalize(proxies, dim=1).T

        # Averages over label entries, as the paper's code; a clamp keeps empty sets at 0, not NaN.
        num_positive = positive.sum()
        num_negative = positive.numel() - num_positive
        positive_term = torch.where(positive, 1 - cos, 0).sum() / num_positive.clamp(min=1)
        negative_term = torch.where(positive, 0, F.relu(cos - zeta)).sum() / num_negative.clamp(min=1)
        loss = positive_term + negative_term
        if self.beta == 0:
            return loss

        # Masks instead of indexing the multi-label rows keep this free of host syncs on the GPU.
        multi_label = positive.sum(dim=1) > 1
        irrelevant = ~shares_label(labels) & multi_label[:, None] & multi_label[None, :]
        pair_cos = unit_codes @ unit_codes.T
        return loss + self.beta * masked_mean(F.relu(pair_cos - zeta), irrelevant)


class ProxyAnchorLoss(ProxyLoss):
    """Proxy-Anchor (Kim et al., CVPR 2020), multi-label: every positive label's proxy is an anchor.

      (1/|P+|) sum_{p in P+} log(1 + sum_{i: y_ip=1} exp(-alpha (c_ip - delta)))
      + (1/C) sum_p log(1 + sum_{i: y_ip=0} exp(alpha (c_ip + delta)))
    with P+ the proxies with a positive sample in the batch.
    """

    name = "proxy_anchor"

    HYPERPARAMETERS = (Hyperparameter("alpha", 32.0, "scale alpha"), Hyperparameter("delta", 0.1, "margin delta"))

    def loss_given_proxies(self, codes, labels, proxies, zeta):
        positive = labels > 0
        cos = cosine_matrix(codes.float(), proxies)
        pull = log_one_plus_sum_exp(-self.alpha * (cos - self.delta), positive)
        push = log_one_plus_sum_exp(self.alpha * (cos + self.delta), ~positive)
        anchors = positive.any(dim=0).sum().clamp(min=1)
        return pull.sum() / anchors + push.sum() / len(proxies)


class HHFLoss(ProxyLoss):
    """HHF (Xu et al., IEEE TMM 2022): Proxy-Anchor with hinged exponents and the code-table zeta.

      (1/|P+|) sum_{p in P+} log(1 + sum_{i: y_ip=1} (exp(alpha relu(1 - delta - c_ip)) - 1))
      + (1/C) sum_p log(1 + sum_{i: y_ip=0} (exp(alpha relu(c_ip - zeta - delta)) - 1))
      + quantization * sum_i ||sign(x_i) - x_i||^2
    """

    name = "hhf"

    HYPERPARAMETERS = (Hyperparameter("alpha", 16.0, "scale alpha"), Hyperparameter("delta", 0.2, "margin delta"),
                       Hyperparameter("quantization", 0.001, "weight of the quantisation term sum ||sign(x) - x||^2"))
    uses_zeta = True

    def loss_given_proxies(self, codes, labels, proxies, zeta):
        positive = labels > 0
        cos = cosine_matrix(codes.float(), proxies)
        # The hinged exponents are at most alpha * 2, so exp cannot overflow; expm1 keeps small ones exact.
        pull_terms = torch.expm1(self.alpha * F.relu(1 - self.delta - cos))
        push_terms = torch.expm1(self.alpha * F.relu(cos - zeta - self.delta))
        pull = torch.log1p(torch.where(positive, pull_terms, 0).sum(dim=0))
        push = torch.log1p(torch.where(positive, 0, push_terms).sum(dim=0))
        anchors = positive.any(dim=0).sum().clamp(min=1)
        return pull.sum() / anchors + push.sum() / len(proxies)

    def code_penalty(self, codes):
        codes = codes.float()
        return self.quantization * (torch.sign(codes) - codes).pow(2).sum()


class PairwiseLikelihoodLoss(HashingLoss):
    """Pairwise likelihood of DHN and DPSH: theta_ik = u_i . u_k / 2 over distinct pairs of the batch,

      mean[log(1 + exp(theta_ik)) - s_ik theta_ik] + quantization * mean(quantization_error(u))
    """

    HYPERPARAMETERS = (Hyperparameter("quantization", 0.1, "weight lambda of the quantisation term"),)

    def quantization_error(self, codes):
        raise NotImplementedError

    def forward(self, codes, labels):
        codes = codes.float()
        theta = 0.5 * codes @ codes.T
        likelihood = F.softplus(theta) - shares_label(labels).float() * theta
        pairs = distinct_pairs(len(codes), codes.device)
        return masked_mean(likelihood, pairs) + self.quantization * self.quantization_error(codes).mean()


class DHNLoss(PairwiseLikelihoodLoss):
    """DHN (Zhu et al., AAAI 2016): pairwise likelihood + lambda * mean log cosh(|u| - 1)."""

    name = "dhn"

    def quantization_error(self, codes):
        return log_cosh(codes.abs() - 1)


class DPSHLoss(PairwiseLikelihoodLoss):
    """DPSH (Li et al., IJCAI 2016): pairwise likelihood + lambda * mean (u - sign u)^2."""

    name = "dpsh"

    def quantization_error(self, codes):
        return (codes - torch.sign(codes)).pow(2)


class HashNetLoss(HashingLoss):
    """HashNet (Cao et al., ICCV 2017): weighted pairwise likelihood on u = tanh(scale * x) with
    theta = alpha u_i . u_k, weights |S|/|S1| (similar) and |S|/|S0| (dissimilar), and the continuation
    scale = sqrt((epoch - 1) // step + 1), set by the training loop through set_epoch (epochs from 1).
    """

    name = "hashnet"

    HYPERPARAMETERS = (Hyperparameter("alpha", 0.1, "scale alpha of the inner product"),
                       Hyperparameter("step", 20, "epochs per continuation step of tanh's scale"))

    def __init__(self, num_classes, hash_bit, **hyperparameters):
        super().__init__(num_classes, hash_bit, **hyperparameters)
        self.register_buffer("scale", torch.ones(()))

    def set_epoch(self, epoch):
        self.scale.fill_(math.sqrt((epoch - 1) // self.step + 1))

    def forward(self, codes, labels):
        relaxed = torch.tanh(self.scale * codes.float())
        theta = self.alpha * relaxed @ relaxed.T
        similar = shares_label(labels)
        likelihood = F.softplus(theta) - similar.float() * theta
        pairs = distinct_pairs(len(codes), codes.device)
        return masked_mean(balanced_pair_weights(similar, pairs) * likelihood, pairs)

    def hyperparameters(self):
        return {**super().hyperparameters(), "scale": self.scale.item()}


class DCHLoss(HashingLoss):
    """DCH (Cao et al., CVPR 2018): Cauchy cross-entropy on d = (n/2)(1 - cos) with balanced weights,

      s log(d/gamma) + log(1 + gamma/d)  (= s log(1 + d/gamma) + (1 - s) log(1 + gamma/d))
      + quantization * mean log(1 + d(|u_i|, 1)/gamma)
    The cosine is capped at 0.99, as in DCH's code, so that d > 0 for identical codes.
    """

    name = "dch"

    HYPERPARAMETERS = (Hyperparameter("gamma", 20.0, "Cauchy scale gamma"),
                       Hyperparameter("quantization", 0.1, "weight lambda of the Cauchy quantisation term"))

    def hamming_estimate(self, cos):
        return (1 - cos.clamp(max=0.99)) * self.hash_bit / 2

    def forward(self, codes, labels):
        codes = codes.float()
        distance = self.hamming_estimate(cosine_matrix(codes, codes))
        similar = shares_label(labels)
        cauchy = torch.where(similar, torch.log1p(distance / self.gamma), torch.log1p(self.gamma / distance))
        pairs = distinct_pairs(len(codes), codes.device)
        pair_term = masked_mean(balanced_pair_weights(similar, pairs) * cauchy, pairs)
        to_binary = self.hamming_estimate(F.cosine_similarity(codes.abs(), torch.ones_like(codes), dim=1))
        return pair_term + self.quantization * torch.log1p(to_binary / self.gamma).mean()


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


class IDHNLoss(HashingLoss):
    """IDHN (Zhang, Zou, Lin, Chen & Wang, IEEE TMM 2020), as its TensorFlow code: soft similarity s = cos(y_i, y_k) and
    softsign codes u = x / (1 + |x|) with ip = u_i . u_k;

      exact pairs (s > 0.99 or s < 0.01): log(1 + exp(theta)) - s theta with theta = scale * ip / n
      soft pairs: gamma * n * ((ip / n + 1) / 2 - s)^2
      + quantization * mean | |u| - 1 |
    """

    name = "idhn"

    HYPERPARAMETERS = (Hyperparameter("scale", 5.0, "scale of the inner product in the likelihood (the code's 'belta')"),
                       Hyperparameter("gamma", 0.1, "weight of the squared loss of soft pairs"),
                       Hyperparameter("quantization", 0.1, "weight of the quantisation term"))

    def forward(self, codes, labels):
        codes = codes.float()
        relaxed = F.softsign(codes)
        positive = (labels > 0).float()
        similarity = cosine_matrix(positive, positive)
        exact = (similarity > 0.99) | (similarity < 0.01)
        normalized_ip = relaxed @ relaxed.T / self.hash_bit
        theta = self.scale * normalized_ip
        likelihood = F.softplus(theta) - similarity * theta
        squared = self.gamma * self.hash_bit * ((normalized_ip + 1) / 2 - similarity).pow(2)
        pairs = distinct_pairs(len(codes), codes.device)
        pair_term = masked_mean(torch.where(exact, likelihood, squared), pairs)
        return pair_term + self.quantization * (relaxed.abs() - 1).abs().mean()


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


class HierarchicalProxyLoss(HashingLoss):
    """Hierarchical proxies (HPL, Yang et al., WACV 2022) on top of a ProxyLoss (docs/METHOD.md §6.9).

    The fine proxies are the wrapped loss's class proxies. Each coarse level groups the C classes: a
    coarse proxy is the mean of its group's fine proxies (so the coarse levels train the fine proxies
    too), and a sample's coarse labels are the groups of its labels. The loss is

      proxy loss(fine) + coarse_weight * sum over coarse levels of proxy loss(coarse level) + code penalty

    with the wrapped loss's formula at every level (HyP2/HHF use zeta of K_l classes at a level of K_l
    groups). The groups are either given (`levels`: one class -> group index list per level, e.g. read
    from a --hierarchy_file) or, with `num_coarse` K, one level found by k-means (scikit-learn, seeded) on
    the fine proxies' directions, recomputed every `refresh_every` training iterations.

    The first `warmup_epochs` epochs (set by the training loop through set_epoch) train the fine level
    alone, and clustering starts from the proxies trained there (HPL starts from trained fine proxies).
    Assignments, iteration and epoch counters are buffers, so they round-trip through state_dict(). The
    paper fixes no refresh period or level weight; the defaults are ours.
    """

    HYPERPARAMETERS = (
        Hyperparameter("refresh_every", 100, "re-cluster the proxies every N training iterations", flag="hierarchy_every"),
        Hyperparameter("coarse_weight", 0.5, "weight of each coarse level's loss", flag="hierarchy_weight"),
        Hyperparameter("warmup_epochs", 0, "epochs of fine-level training before the first clustering "
                       "(and before any coarse level counts)", flag="hierarchy_warmup"))

    def __init__(self, base, num_coarse=0, seed=0, levels=None, **hyperparameters):
        if not isinstance(base, ProxyLoss):
            raise ValueError(f"hierarchical proxies need a proxy loss ({', '.join(PROXY_LOSSES)}), "
                             f"not {base.name or type(base).__name__}")
        super().__init__(base.num_classes, base.hash_bit, **hyperparameters)
        if self.refresh_every < 1:
            raise ValueError(f"the refresh period must be >= 1 iteration, got {self.refresh_every}")
        if self.warmup_epochs < 0:
            raise ValueError(f"the warm-up must be >= 0 epochs, got {self.warmup_epochs}")
        self.base = base
        self.seed = int(seed)
        self.given = levels is not None
        if self.given:
            # A given hierarchy is a (levels, C) buffer; the clustered one keeps its (C,) `assignment`
            # buffer, so training states of earlier versions still resume.
            given = torch.as_tensor(levels, dtype=torch.long).reshape(-1, base.num_classes)
            self.register_buffer("given_levels", given)
            self.level_sizes = [int(level.max()) + 1 for level in given]
        else:
            if not 2 <= num_coarse < base.num_classes:
                raise ValueError(f"the coarse level needs 2 to {base.num_classes - 1} clusters for "
                                 f"{base.num_classes} classes, got {num_coarse}")
            self.register_buffer("assignment", torch.zeros(base.num_classes, dtype=torch.long))
            self.level_sizes = [int(num_coarse)]
        self.num_coarse = self.level_sizes[0]
        self.level_zetas = [base.coarse_zeta(size) for size in self.level_sizes]
        self.coarse_zeta = self.level_zetas[0]
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.epoch = 0  # set by the training loop before every epoch, so no state of its own
        self.refresh()

    def level_assignment(self, level):
        """(C,) class -> group index at coarse level `level`."""
        return self.given_levels[level] if self.given else self.assignment

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def warming_up(self):
        """Epochs count from 1, so epoch <= warmup_epochs is inside the warm-up."""
        return self.training and self.warmup_epochs > 0 and self.epoch <= self.warmup_epochs

    @torch.no_grad()
    def refresh(self):
        """Re-cluster the fine proxies (a given hierarchy stays): the losses compare directions, so k-means
        runs on unit vectors."""
        if self.given:
            return
        from sklearn.cluster import KMeans
        directions = F.normalize(self.base.proxies.detach().float(), dim=1).cpu().double().numpy()
        clusters = KMeans(n_clusters=self.num_coarse, n_init=10, random_state=self.seed).fit_predict(directions)
        self.assignment.copy_(torch.as_tensor(clusters, dtype=torch.long))

    def membership(self, level=0):
        """(C, K_l) one-hot group membership of the classes at coarse level `level`."""
        return F.one_hot(self.level_assignment(level), self.level_sizes[level]).to(self.base.proxies.dtype)

    def coarse_proxies(self, level=0):
        membership = self.membership(level)
        sizes = membership.sum(dim=0).clamp(min=1)  # k-means may leave a cluster empty on duplicate proxies
        return (membership.T @ self.base.proxies) / sizes[:, None]

    def coarse_labels(self, labels, level=0):
        return ((labels > 0).to(self.base.proxies.dtype) @ self.membership(level) > 0).float()

    def forward(self, codes, labels):
        base = self.base
        loss = base.loss_given_proxies(codes, labels, base.proxies, base.zeta) + base.code_penalty(codes)
        if self.warming_up():
            return loss
        if self.training:
            if int(self.iteration) % self.refresh_every == 0:
                self.refresh()
            self.iteration += 1
        for level, zeta in enumerate(self.level_zetas):
            coarse = base.loss_given_proxies(codes, self.coarse_labels(labels, level), self.coarse_proxies(level), zeta)
            loss = loss + self.coarse_weight * coarse
        return loss

    def hyperparameters(self):
        settings = {**self.base.hyperparameters(),
                    "hierarchy": "given" if self.given else self.num_coarse, "hierarchy_levels": self.level_sizes,
                    "hierarchy_every": self.refresh_every, "hierarchy_weight": self.coarse_weight,
                    "hierarchy_warmup": self.warmup_epochs}
        if self.coarse_zeta is not None:
            settings["coarse_zeta"] = self.level_zetas if self.given else self.coarse_zeta
        return settings


def class_proxies(loss):
    """The learnable class proxies of a proxy loss, hierarchical or not."""
    return loss.base.proxies if isinstance(loss, HierarchicalProxyLoss) else loss.proxies


def label_probabilities(codes, proxies, margin, temperature):
    """(B, C) per-label probabilities sigma((cos(x_i, P_c) - margin) / T) (docs/METHOD.md §8.2)."""
    return torch.sigmoid((cosine_matrix(codes, proxies) - margin) / temperature)


def binary_kl(teacher, student, eps=1e-6):
    """Elementwise KL(Bernoulli(teacher) || Bernoulli(student))."""
    teacher, student = teacher.clamp(eps, 1 - eps), student.clamp(eps, 1 - eps)
    return teacher * torch.log(teacher / student) + (1 - teacher) * torch.log((1 - teacher) / (1 - student))


def multi_positive_info_nce(codes, proxies, labels, tau):
    """Mean over samples with a label of -(1/|Y_i|) sum_{c in Y_i} log(e^{z_ic} / (e^{z_ic} + sum_{c' not in Y_i}
    e^{z_ic'})), z = cos(x, P) / tau: each positive proxy against the negatives only (docs/METHOD.md §8.4)."""
    positive = labels > 0
    logits = cosine_matrix(codes, proxies) / tau
    negatives = torch.logsumexp(torch.where(positive, float("-inf"), logits), dim=1, keepdim=True)
    log_ratio = logits - torch.logaddexp(logits, negatives)
    count = positive.sum(dim=1)
    per_sample = -torch.where(positive, log_ratio, 0).sum(dim=1) / count.clamp(min=1)
    return masked_mean(per_sample, count > 0)


class CollaborativeExpertsLoss(HashingLoss):
    """E hash heads trained together, after ECL (Xu et al., IEEE TMM 2023) as docs/METHOD.md §8 reads it.

    codes: (B, E, n), one output per head; every head has its own proxy loss (own proxies). With
    p^e = label_probabilities(x^e, P^e, m = (1 + zeta) / 2, temperature):

      L = sum_e L_head(x^e) + distill * L_kd + feature * L_feat + contrastive * L_con
      L_kd   = mean over ordered head pairs (e, f), e != f, of mean_{i,c} w_c KL(p^f_ic (detached) || p^e_ic)
      L_feat = mean over head pairs of mean_i (1 - cos(x^e_i, x^f_i))
      L_con  = mean over heads of multi_positive_info_nce(x^e, P^e, y, tau)

    w_c (detached, mean 1) = 1 + reweight * max(0, S_label,c - S_distill,c), from two probe classifiers on
    the detached mean code: one trained by BCE on the labels, one on the heads' mean probabilities;
    S_.,c is an EMA (momentum `ema`) of each probe's mean probability on the positives of class c.
    A weight of 0 switches a term off; reweight 0 gives uniform w.
    """

    HYPERPARAMETERS = (
        Hyperparameter("distill", 0.0, "weight of the mutual distillation between heads", flag="ecl_distill"),
        Hyperparameter("temperature", 0.2, "temperature T of the per-label probabilities", flag="ecl_temperature"),
        Hyperparameter("reweight", 4.0, "gamma of the per-class distillation weights (0: uniform)",
                       flag="ecl_reweight"),
        Hyperparameter("ema", 0.99, "momentum of the probes' per-class scores", flag="ecl_ema"),
        Hyperparameter("feature", 0.0, "weight of the feature distillation 1 - cos between heads", flag="ecl_feature"),
        Hyperparameter("contrastive", 0.0, "weight of the sample-proxy contrastive term", flag="ecl_contrastive"),
        Hyperparameter("tau", 0.1, "temperature of the contrastive term", flag="ecl_tau"))

    def __init__(self, heads, **hyperparameters):
        heads = list(heads)
        if len(heads) < 2:
            raise ValueError(f"collaborative experts need at least 2 heads, got {len(heads)}")
        if not all(isinstance(head, (ProxyLoss, HierarchicalProxyLoss)) for head in heads):
            raise ValueError(f"collaborative experts need a proxy loss ({', '.join(PROXY_LOSSES)})")
        super().__init__(heads[0].num_classes, heads[0].hash_bit, **hyperparameters)
        if self.temperature <= 0 or self.tau <= 0:
            raise ValueError("the temperatures --ecl_temperature and --ecl_tau must be > 0")
        if not 0 <= self.ema < 1:
            raise ValueError(f"--ecl_ema must be in [0, 1), got {self.ema}")
        self.heads = nn.ModuleList(heads)
        zeta = getattr(heads[0], "zeta", None)
        zeta = getattr(heads[0].base, "zeta", None) if isinstance(heads[0], HierarchicalProxyLoss) else zeta
        self.margin = (1 + (zeta or 0.0)) / 2
        if self.reweighted:
            # Probes exist only when their weights are used, so that no parameter goes without a gradient (DDP).
            self.label_probe = nn.Linear(self.hash_bit, self.num_classes)
            self.distill_probe = nn.Linear(self.hash_bit, self.num_classes)
            self.register_buffer("label_scores", torch.full((self.num_classes,), 0.5))
            self.register_buffer("distill_scores", torch.full((self.num_classes,), 0.5))

    @property
    def reweighted(self):
        return self.distill > 0 and self.reweight > 0

    @property
    def num_heads(self):
        return len(self.heads)

    def set_epoch(self, epoch):
        for head in self.heads:
            if hasattr(head, "set_epoch"):
                head.set_epoch(epoch)

    def head_pairs(self):
        return [(e, f) for e in range(self.num_heads) for f in range(self.num_heads) if e != f]

    def probabilities(self, codes):
        """(E, B, C) per-label probabilities of every head."""
        return torch.stack([label_probabilities(codes[:, e], class_proxies(head), self.margin, self.temperature)
                            for e, head in enumerate(self.heads)])

    def class_weights(self, codes, labels, probabilities):
        """((C,) detached distillation weights of mean 1, the probes' own loss); updates the probes' scores."""
        if not self.reweighted:
            return torch.ones(self.num_classes, device=codes.device), codes.new_zeros(())
        features = codes.detach().mean(dim=1)
        label_logits, distill_logits = self.label_probe(features), self.distill_probe(features)
        probe_loss = (F.binary_cross_entropy_with_logits(label_logits, (labels > 0).float())
                      + F.binary_cross_entropy_with_logits(distill_logits, probabilities.detach().mean(dim=0)))
        if self.training:
            self.update_scores(label_logits.detach(), distill_logits.detach(), labels)
        weights = 1 + self.reweight * F.relu(self.label_scores - self.distill_scores)
        return (weights / weights.mean()).detach(), probe_loss

    @torch.no_grad()
    def update_scores(self, label_logits, distill_logits, labels):
        positive = (labels > 0).float()
        count = positive.sum(dim=0)
        seen = count > 0
        for scores, logits in ((self.label_scores, label_logits), (self.distill_scores, distill_logits)):
            batch_scores = (torch.sigmoid(logits) * positive).sum(dim=0) / count.clamp(min=1)
            scores.copy_(torch.where(seen, self.ema * scores + (1 - self.ema) * batch_scores, scores))

    def distillation(self, probabilities, weights):
        terms = [(weights * binary_kl(probabilities[f].detach(), probabilities[e])).mean()
                 for e, f in self.head_pairs()]
        return torch.stack(terms).mean()

    def feature_distillation(self, codes):
        terms = [(1 - F.cosine_similarity(codes[:, e], codes[:, f], dim=1)).mean() for e, f in self.head_pairs()]
        return torch.stack(terms).mean()

    def contrastive_term(self, codes, labels):
        return torch.stack([multi_positive_info_nce(codes[:, e], class_proxies(head), labels, self.tau)
                            for e, head in enumerate(self.heads)]).mean()

    def forward(self, codes, labels):
        codes = codes.float()
        if codes.dim() != 3 or codes.shape[1] != self.num_heads:
            raise ValueError(f"expected (batch, {self.num_heads} heads, bits) outputs, got {tuple(codes.shape)}")
        loss = sum(head(codes[:, e], labels) for e, head in enumerate(self.heads))
        if self.distill > 0:
            probabilities = self.probabilities(codes)
            weights, probe_loss = self.class_weights(codes, labels, probabilities)
            # The probes see detached codes, so their loss trains them alone.
            loss = loss + self.distill * self.distillation(probabilities, weights) + probe_loss
        if self.feature > 0:
            loss = loss + self.feature * self.feature_distillation(codes)
        if self.contrastive > 0:
            loss = loss + self.contrastive * self.contrastive_term(codes, labels)
        return loss

    def hyperparameters(self):
        own = {f"ecl_{name}": value for name, value in super().hyperparameters().items()}
        return {**self.heads[0].hyperparameters(), "experts": self.num_heads, **own}


LOSSES = {loss_class.name: loss_class for loss_class in (
    HyP2Loss, ProxyAnchorLoss, HHFLoss, DHNLoss, DPSHLoss, HashNetLoss, DCHLoss, CSQLoss, IDHNLoss, OrthoHashLoss)}

PROXY_LOSSES = [name for name, loss_class in LOSSES.items() if issubclass(loss_class, ProxyLoss)]


def loss_label(name, hierarchy=0, experts=1):
    """The loss as output files and tables name it: the name, plus _hplK with K hierarchical clusters or
    _hpl-NAME with the given hierarchy NAME (a str), plus _eclE with E collaborative heads."""
    if isinstance(hierarchy, str):
        name += f"_hpl-{hierarchy}"
    elif hierarchy:
        name += f"_hpl{hierarchy}"
    return name + (f"_ecl{experts}" if experts > 1 else "")


def tunable_hyperparameters(name):
    """{hyper-parameter: published default} of the loss `name` (zeta and seed come from the run)."""
    return {spec.name: spec.default for spec in LOSSES[name].HYPERPARAMETERS}


def build_loss(name, num_classes, hash_bit, zeta=None, seed=0, hierarchy=0, hierarchy_settings=None,
               **hyperparameters):
    """The loss registered under `name`, e.g. build_loss("hyp2", 20, 48, beta=0.5).

    zeta and seed reach the losses that use them (zeta=None: the code table's value). hierarchy K > 0
    wraps the loss in HierarchicalProxyLoss with K clusters, and a list of level assignments (one
    class -> group index list per level) in one with that given hierarchy; `hierarchy_settings` are its
    hyper-parameters. Raises ValueError for an unknown name or impossible settings.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    loss_class = LOSSES[name]
    run_supplied = {"zeta": zeta} if loss_class.uses_zeta else {}
    run_supplied.update({"seed": seed} if loss_class.uses_seed else {})
    loss = loss_class(num_classes, hash_bit, **run_supplied, **hyperparameters)
    if isinstance(hierarchy, (list, tuple)):
        return HierarchicalProxyLoss(loss, seed=seed, levels=hierarchy, **(hierarchy_settings or {}))
    if not hierarchy:
        return loss
    return HierarchicalProxyLoss(loss, hierarchy, seed, **(hierarchy_settings or {}))


def build_experts_loss(experts, build_head, **settings):
    """CollaborativeExpertsLoss over `experts` heads, each `build_head()` (a fresh proxy loss, so every
    head draws its own proxies), with its hyper-parameters `settings`; ValueError for impossible ones."""
    return CollaborativeExpertsLoss([build_head() for _ in range(experts)], **settings)
