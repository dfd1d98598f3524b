"""Proxy losses: one learnable proxy per class (docs/METHOD.md §2 for HyP2, §6.1-6.2 for the baselines)."""
import torch
import torch.nn.functional as F
from torch import nn

from hashing import codetable

from .base import HashingLoss, Hyperparameter, cosine_matrix, masked_mean, shares_label


def log_one_plus_sum_exp(logits, mask):
    """Per column j: log(1 + sum over rows i with mask[i, j] of exp(logits[i, j])), without overflow."""
    masked = torch.where(mask, logits, float("-inf"))
    zero_row = torch.zeros_like(logits[:1])
    return torch.logsumexp(torch.cat([zero_row, masked]), dim=0)


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
