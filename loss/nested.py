"""Nested codes: one network whose first b outputs are trained as a b-bit code for every listed length b,
after Matryoshka Representation Learning (Kusupati et al., NeurIPS 2022) (docs/METHOD.md §14)."""
from torch import nn

from .base import HashingLoss


class NestedLoss(HashingLoss):
    """L = sum_b w_b * loss_b(codes[:, :b], labels) over the ascending prefix lengths b_1 < ... < b_k = n.

    Each loss_b is a whole loss of b bits, built for that length (its own zeta from the code table, its
    own proxies, hash centres or codebook of dimension b), so every prefix is trained exactly as a b-bit
    run would train it. The weights default to 1 each, MRL's choice (its c_m = 1).
    """

    def __init__(self, prefix_losses, weights=None):
        prefix_losses = list(prefix_losses)
        lengths = [loss.hash_bit for loss in prefix_losses]
        if not lengths or lengths != sorted(set(lengths)):
            raise ValueError(f"the prefix lengths must be distinct and ascending, got {lengths}")
        if any(getattr(loss, "uses_item_indices", False) for loss in prefix_losses):
            raise ValueError("a loss with a memory of the training codes keeps codes of one length; train it "
                             "without the memory")
        weights = [1.0] * len(lengths) if weights is None else [float(weight) for weight in weights]
        if len(weights) != len(lengths) or any(weight < 0 for weight in weights) or not any(weights):
            raise ValueError(f"need one weight >= 0 per prefix length ({len(lengths)}), not all 0, got {weights}")
        super().__init__(prefix_losses[0].num_classes, lengths[-1])
        self.prefix_losses = nn.ModuleList(prefix_losses)
        self.lengths = lengths
        self.weights = weights

    def set_epoch(self, epoch):
        for loss in self.prefix_losses:
            if hasattr(loss, "set_epoch"):
                loss.set_epoch(epoch)

    def prefix_terms(self, codes, labels):
        """[loss_b(codes[:, :b], labels) for every length b], unweighted."""
        if codes.shape[-1] != self.hash_bit:
            raise ValueError(f"expected outputs of {self.hash_bit} bits, got {tuple(codes.shape)}")
        return [loss(codes[:, :bits], labels) for bits, loss in zip(self.lengths, self.prefix_losses)]

    def forward(self, codes, labels):
        return sum(weight * term for weight, term in zip(self.weights, self.prefix_terms(codes, labels)))

    def hyperparameters(self):
        """The last length's settings, then each shorter prefix's zeta (where the loss has one) and the weights."""
        settings = dict(self.prefix_losses[-1].hyperparameters())
        settings.update(nested_bits=self.lengths, nested_weights=self.weights)
        # a hierarchical loss keeps its zeta in the proxy loss it wraps
        zetas = [getattr(getattr(loss, "base", loss), "zeta", None) for loss in self.prefix_losses]
        if any(zeta is not None for zeta in zetas):
            settings["nested_zetas"] = zetas
        return settings
