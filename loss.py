"""Hashing losses. Each is an nn.Module called as loss(codes, labels) with codes (B, n) real-valued
network outputs and labels (B, C) multi-hot; learnable state (proxies) lives inside the module."""
import torch
import torch.nn.functional as F
from torch import nn

from utils import codetable


class HyP2Loss(nn.Module):
    """HyP2 loss (Xu et al., ACM MM 2022): learnable class proxies plus an irrelevant-pair term.

    With c_ij = cos(x_i, P_j) and threshold zeta:
      L+    = mean over label entries y_ij = 1 of (1 - c_ij)
      L-    = mean over label entries y_ij = 0 of relu(c_ij - zeta)
      Lpair = beta * mean over pairs (i, k) of samples with more than one label that share no label
              of relu(cos(x_i, x_k) - zeta); 0 when there is no such pair.
    zeta=None takes the best-known-code value for (hash_bit, num_classes); beta=0 is proxy-only.
    """

    def __init__(self, num_classes, hash_bit, beta=0.5, zeta=None):
        super().__init__()
        self.num_classes = num_classes
        self.hash_bit = hash_bit
        self.beta = float(beta)
        self.zeta = codetable.zeta(hash_bit, num_classes) if zeta is None else float(zeta)
        self.proxies = nn.Parameter(torch.empty(num_classes, hash_bit))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, codes, labels):
        codes = codes.float()
        positive = labels > 0
        unit_codes = F.normalize(codes, dim=1)
        cos = unit_codes @ F.normalize(self.proxies, dim=1).T

        # Averages over label entries, as the paper's code; a clamp keeps empty sets at 0, not NaN.
        num_positive = positive.sum()
        num_negative = positive.numel() - num_positive
        positive_term = torch.where(positive, 1 - cos, 0).sum() / num_positive.clamp(min=1)
        negative_term = torch.where(positive, 0, F.relu(cos - self.zeta)).sum() / num_negative.clamp(min=1)
        loss = positive_term + negative_term
        if self.beta == 0:
            return loss

        # Masks instead of indexing the multi-label rows keep this free of host syncs on the GPU.
        multi_label = positive.sum(dim=1) > 1
        shares_label = (positive.float() @ positive.float().T) > 0
        irrelevant = ~shares_label & multi_label[:, None] & multi_label[None, :]
        pair_cos = unit_codes @ unit_codes.T
        pair_term = (torch.where(irrelevant, F.relu(pair_cos - self.zeta), 0).sum()
                     / irrelevant.sum().clamp(min=1))
        return loss + self.beta * pair_term

    def extra_repr(self):
        return f"num_classes={self.num_classes}, hash_bit={self.hash_bit}, beta={self.beta}, zeta={self.zeta:.4f}"


LOSSES = {
    "hyp2": HyP2Loss,
}


def build_loss(name, num_classes, hash_bit, **hyperparameters):
    """The loss registered under `name`, e.g. build_loss("hyp2", 20, 48, beta=0.5)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name](num_classes, hash_bit, **hyperparameters)
