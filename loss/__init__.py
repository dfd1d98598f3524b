"""Hashing losses. Each is an nn.Module called as loss(codes, labels) with codes (B, n) real-valued
network outputs and labels (B, C) multi-hot; every piece of state (proxies, hash centres, codebooks,
HashNet's scale, the hierarchy's clusters) lives inside the module as a parameter or buffer, so
state_dict() round-trips it.

Multi-label convention: a label entry is positive when it is > 0, and two samples are similar when they
share a label. Pair-based losses use the pairs of distinct samples of the batch. Formulas, sources and
defaults: docs/METHOD.md §2 (HyP2), §6 (the baselines) and §8 (the hierarchy and experts schemes).

The package, by family (the layout of pytorch-metric-learning's losses/):
  base.py          Hyperparameter, HashingLoss and the helpers the families share
  proxy.py         learnable class proxies: HyP2, Proxy-Anchor, HHF
  pairwise.py      pairs of the batch: DHN, DPSH, HashNet, DCH, IDHN
  target_codes.py  fixed targets from the seed: CSQ, OrthoHash
  hierarchy.py     the hierarchical-proxies scheme (HPL) around a proxy loss
  experts.py       the collaborative-experts scheme (ECL) over several heads
  nested.py        nested codes: one loss per prefix length of the code (Matryoshka)
  registry.py      LOSSES by --loss name
"""
from .base import HashingLoss, Hyperparameter, SeededTargetsLoss
from .experts import CollaborativeExpertsLoss
from .hierarchy import HierarchicalProxyLoss
from .nested import NestedLoss
from .pairwise import DCHLoss, DHNLoss, DPSHLoss, HashNetLoss, IDHNLoss, PairwiseLikelihoodLoss
from .proxy import HHFLoss, HyP2Loss, ProxyAnchorLoss, ProxyLoss
from .registry import LOSSES, PROXY_LOSSES, tunable_hyperparameters
from .target_codes import CSQLoss, OrthoHashLoss, hash_centres

__all__ = ["LOSSES", "PROXY_LOSSES", "CSQLoss", "CollaborativeExpertsLoss", "DCHLoss", "DHNLoss", "DPSHLoss",
           "HHFLoss", "HashNetLoss", "HashingLoss", "HierarchicalProxyLoss", "Hyperparameter", "HyP2Loss",
           "IDHNLoss", "NestedLoss", "OrthoHashLoss", "PairwiseLikelihoodLoss", "ProxyAnchorLoss", "ProxyLoss",
           "SeededTargetsLoss", "build_experts_loss", "build_loss", "build_nested_loss", "hash_centres",
           "tunable_hyperparameters"]


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


def build_nested_loss(lengths, build_prefix, weights=None):
    """NestedLoss over the ascending prefix `lengths`, each `build_prefix(b)` (a whole loss of b bits, with
    its own zeta and targets of that length); ValueError for impossible ones."""
    return NestedLoss([build_prefix(bits) for bits in lengths], weights)
