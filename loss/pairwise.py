"""Pairwise losses over the distinct pairs of a batch: DHN, DPSH, HashNet, DCH and IDHN
(docs/METHOD.md §6.3-6.5, §6.7)."""
import math

import torch
import torch.nn.functional as F

from .base import HashingLoss, Hyperparameter, cosine_matrix, distinct_pairs, masked_mean, shares_label


def balanced_pair_weights(similar, pairs):
    """HashNet/DCH weights |S|/|S1| for similar and |S|/|S0| for dissimilar pairs among `pairs`."""
    num_pairs = pairs.sum()
    num_similar = (similar & pairs).sum()
    num_dissimilar = num_pairs - num_similar
    return torch.where(similar, num_pairs / num_similar.clamp(min=1), num_pairs / num_dissimilar.clamp(min=1))


def log_cosh(values):
    """log(cosh(x)) for any x: |x| + log(1 + exp(-2|x|)) - log 2 does not overflow."""
    magnitude = values.abs()
    return magnitude + F.softplus(-2 * magnitude) - math.log(2.0)


class PairwiseLikelihoodLoss(HashingLoss):
    """Pairwise likelihood of DHN and DPSH: theta_ik = u_i . u_k / 2 over distinct pairs of the batch,

      mean[log(1 + exp(theta_ik)) - s_ik theta_ik] + quantization * mean(quantization_error(u))

    gradient_factors=2 back-propagates through both factors of u_i . u_k (the papers' analytic gradient);
    1 through the first only, as DeepHash-pytorch's product with a detached memory of codes does, which
    halves the pair term's gradient and leaves its value and the quantisation term as they are.

    memory=1 is DeepHash-pytorch's pairing itself: a memory U (N, n) and Y (N, C) of every training item's
    latest code (detached) and labels, updated with the batch (U[ind] = u, Y[ind] = y) before the batch is
    paired with all N rows, the item itself and rows not yet visited (U = 0, so log 2 without gradient)
    included, and the pair term is the mean over that B x N matrix. It needs gradient_factors=1, the
    training-set size (attach_training_set) and the batch's item indices (forward's third argument).
    """

    HYPERPARAMETERS = (Hyperparameter("quantization", 0.1, "weight lambda of the quantisation term"),
                       Hyperparameter("gradient_factors", 2, "factors of u_i.u_k the pair term's gradient flows "
                                      "through: 2 (both, the analytic gradient) or 1 (DeepHash-pytorch's detached "
                                      "memory: half the pair gradient)"),
                       Hyperparameter("memory", 0, "1: pair each batch with a memory of every training item's "
                                      "latest code and labels, as DeepHash-pytorch (needs gradient_factors 1); "
                                      "0: the batch's own pairs"))

    def __init__(self, num_classes, hash_bit, **hyperparameters):
        super().__init__(num_classes, hash_bit, **hyperparameters)
        if self.gradient_factors not in (1, 2):
            raise ValueError(f"gradient_factors is 1 (one factor, detached) or 2 (both), not {self.gradient_factors}")
        if self.memory not in (0, 1):
            raise ValueError(f"memory is 0 (the batch's pairs) or 1 (a memory of the training set), not {self.memory}")
        if self.memory and self.gradient_factors != 1:
            raise ValueError("memory 1 pairs the batch with detached codes, so the pair gradient flows through one "
                             f"factor: set gradient_factors 1 (--{self.name}_gradient_factors 1)")

    @property
    def uses_item_indices(self):
        """Whether forward needs the batch's item indices (the training loop passes them when it does)."""
        return bool(self.memory)

    def attach_training_set(self, size):
        """Allocate the memory of `size` training items (zeros: not visited yet); a no-op without memory."""
        if self.memory:
            self.register_buffer("memory_codes", torch.zeros(size, self.hash_bit))
            self.register_buffer("memory_labels", torch.zeros(size, self.num_classes))

    def quantization_error(self, codes):
        raise NotImplementedError

    def forward(self, codes, labels, indices=None):
        codes = codes.float()
        if self.memory:
            pair_term = self.memory_pair_term(codes, labels, indices)
        else:
            partners = codes if self.gradient_factors == 2 else codes.detach()
            theta = 0.5 * codes @ partners.T
            likelihood = F.softplus(theta) - shares_label(labels).float() * theta
            pair_term = masked_mean(likelihood, distinct_pairs(len(codes), codes.device))
        return pair_term + self.quantization * self.quantization_error(codes).mean()

    def memory_pair_term(self, codes, labels, indices):
        if not hasattr(self, "memory_codes"):
            raise ValueError("memory 1 needs the training-set size: call attach_training_set(N) first")
        if indices is None:
            raise ValueError("memory 1 needs the item indices of the batch (forward's third argument)")
        positive = (labels > 0).float()
        self.memory_codes[indices] = codes.detach()
        self.memory_labels[indices] = positive
        theta = 0.5 * codes @ self.memory_codes.T
        similar = (positive @ self.memory_labels.T) > 0
        return (F.softplus(theta) - similar.float() * theta).mean()


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

    As the authors' code (thuml/HashNet) instead: alpha_over_bits > 0 sets alpha = alpha_over_bits / n
    (theirs is 10 / n), and similar_weight c > 0 weighs similar pairs c and dissimilar ones 1, the loss
    being the weighted mean (their class_num).
    """

    name = "hashnet"

    HYPERPARAMETERS = (Hyperparameter("alpha", 0.1, "scale alpha of the inner product"),
                       Hyperparameter("step", 20, "epochs per continuation step of tanh's scale"),
                       Hyperparameter("alpha_over_bits", 0.0, "if > 0, alpha is this / n instead of --hashnet_alpha "
                                      "(thuml/HashNet: 10, i.e. 10/n)"),
                       Hyperparameter("similar_weight", 0.0, "0: the batch's balance weights |S|/|S1|, |S|/|S0|; "
                                      "c > 0: weight c on similar pairs, 1 on dissimilar ones, and the weighted "
                                      "mean (thuml/HashNet's class_num)"))

    def __init__(self, num_classes, hash_bit, **hyperparameters):
        super().__init__(num_classes, hash_bit, **hyperparameters)
        for name in ("alpha_over_bits", "similar_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is 0 (off) or positive, not {getattr(self, name)}")
        self.register_buffer("scale", torch.ones(()))

    def set_epoch(self, epoch):
        self.scale.fill_(math.sqrt((epoch - 1) // self.step + 1))

    def inner_product_scale(self):
        return self.alpha_over_bits / self.hash_bit if self.alpha_over_bits > 0 else self.alpha

    def forward(self, codes, labels):
        relaxed = torch.tanh(self.scale * codes.float())
        theta = self.inner_product_scale() * relaxed @ relaxed.T
        similar = shares_label(labels)
        likelihood = F.softplus(theta) - similar.float() * theta
        pairs = distinct_pairs(len(codes), codes.device)
        if self.similar_weight == 0:
            return masked_mean(balanced_pair_weights(similar, pairs) * likelihood, pairs)
        weights = torch.where(pairs, torch.where(similar, self.similar_weight, 1.0), 0.0)
        total = weights.sum()
        return (weights * likelihood).sum() / torch.where(total > 0, total, 1.0)

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
