"""Hierarchical proxies (HPL): a training scheme around a proxy loss (docs/METHOD.md §8)."""
import torch
import torch.nn.functional as F

from .base import HashingLoss, Hyperparameter
from .proxy import ProxyLoss
from .registry import PROXY_LOSSES


class HierarchicalProxyLoss(HashingLoss):
    """Hierarchical proxies (HPL, Yang et al., WACV 2022) on top of a ProxyLoss (docs/METHOD.md §8.1).

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
