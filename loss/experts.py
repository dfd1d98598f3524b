"""Collaborative hash experts (ECL): a training scheme of E heads, each with its own proxy loss
(docs/METHOD.md §8)."""
import torch
import torch.nn.functional as F
from torch import nn

from .base import HashingLoss, Hyperparameter, cosine_matrix, masked_mean
from .hierarchy import HierarchicalProxyLoss
from .proxy import ProxyLoss
from .registry import PROXY_LOSSES


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
    e^{z_ic'})), z = cos(x, P) / tau: each positive proxy against the negatives only (docs/METHOD.md §8.2)."""
    positive = labels > 0
    logits = cosine_matrix(codes, proxies) / tau
    negatives = torch.logsumexp(torch.where(positive, float("-inf"), logits), dim=1, keepdim=True)
    log_ratio = logits - torch.logaddexp(logits, negatives)
    count = positive.sum(dim=1)
    per_sample = -torch.where(positive, log_ratio, 0).sum(dim=1) / count.clamp(min=1)
    return masked_mean(per_sample, count > 0)


class CollaborativeExpertsLoss(HashingLoss):
    """E hash heads trained together, after ECL (Xu et al., IEEE TMM 2023) as docs/METHOD.md §8.2 reads it.

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
