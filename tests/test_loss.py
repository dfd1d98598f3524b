import math

import numpy as np
import pytest
import torch

from loss import HyP2Loss, build_loss
from hashing import codetable


def _unit(v):
    norm = max(math.sqrt(sum(x * x for x in v)), 1e-12)
    return [x / norm for x in v]


def _cos(a, b):
    return sum(x * y for x, y in zip(_unit(a), _unit(b)))


def reference_hyp2(codes, labels, proxies, beta, zeta):
    """docs/METHOD.md §2, one entry and one pair at a time."""
    codes, labels, proxies = codes.tolist(), labels.tolist(), proxies.tolist()
    pos, n_pos, neg, n_neg = 0.0, 0, 0.0, 0
    for x, y in zip(codes, labels):
        for p, y_j in zip(proxies, y):
            c = _cos(x, p)
            if y_j > 0:
                pos, n_pos = pos + (1 - c), n_pos + 1
            else:
                neg, n_neg = neg + max(c - zeta, 0.0), n_neg + 1
    loss = (pos / n_pos if n_pos else 0.0) + (neg / n_neg if n_neg else 0.0)
    multi = [i for i, y in enumerate(labels) if sum(v > 0 for v in y) > 1]
    pairs = [(i, k) for i in multi for k in multi
             if i != k and not any(a > 0 and b > 0 for a, b in zip(labels[i], labels[k]))]
    if beta and pairs:
        loss += beta * sum(max(_cos(codes[i], codes[k]) - zeta, 0.0) for i, k in pairs) / len(pairs)
    return loss


def random_labels(rng, batch, classes, density):
    labels = (rng.random((batch, classes)) < density).astype(np.float32)
    labels[0] = 0                       # an all-negative row
    labels[1] = 0
    labels[1, rng.integers(classes)] = 1  # a single-label row
    return labels


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(beta, seed):
    rng = np.random.default_rng(seed)
    batch, classes, bits = 12, 7, 16
    criterion = HyP2Loss(classes, bits, beta=beta)
    codes = torch.tensor(rng.standard_normal((batch, bits)), dtype=torch.float32)
    labels = torch.tensor(random_labels(rng, batch, classes, 0.3))
    expected = reference_hyp2(codes, labels, criterion.proxies.detach(), beta, criterion.zeta)
    assert criterion(codes, labels).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_hand_worked_example():
    # x1 = (1, 0) with labels {0, 1}; x2 = (0, 1) with labels {2, 3}; proxies at +-axes; zeta = -0.5.
    # cos(x1, P) = [1, 0, -1, 0], cos(x2, P) = [0, 1, 0, -1].
    # L+ = (0 + 1 + 1 + 2) / 4 = 1;  L- = (0 + 0.5 + 0.5 + 1.5) / 4 = 0.625
    # one irrelevant pair of multi-label samples: relu(0 + 0.5) = 0.5, times beta 0.5 -> 0.25
    criterion = HyP2Loss(4, 2, beta=0.5, zeta=-0.5)
    with torch.no_grad():
        criterion.proxies.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
    codes = torch.tensor([[1.0, 0], [0, 1]])
    labels = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]])
    assert criterion(codes, labels).item() == pytest.approx(1.875)


def test_zeta_defaults_to_the_code_table():
    assert HyP2Loss(20, 48).zeta == codetable.zeta(48, 20)
    assert HyP2Loss(38, 24).zeta == pytest.approx(1 - 20 / 24)
    assert HyP2Loss(20, 48, zeta=0.25).zeta == 0.25


def test_proxies_are_learnable_and_seeded():
    torch.manual_seed(3)
    first = HyP2Loss(10, 32)
    torch.manual_seed(3)
    second = HyP2Loss(10, 32)
    assert first.proxies.shape == (10, 32) and first.proxies.requires_grad
    assert torch.equal(first.proxies, second.proxies)
    assert [name for name, _ in first.named_parameters()] == ["proxies"]


@pytest.mark.parametrize("labels", [
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]],      # single-label batch: no pair term
    [[1, 1, 0], [1, 0, 1], [0, 1, 1]],      # multi-label, but every pair shares a label
    [[0, 0, 0], [0, 0, 0], [0, 0, 0]],      # all-negative rows: no positive entry at all
    [[1, 1, 1], [1, 1, 1], [1, 1, 1]],      # no negative entry at all
])
def test_edge_cases_are_finite_with_finite_gradients(labels):
    criterion = HyP2Loss(3, 8, beta=0.5)
    codes = torch.randn(3, 8, requires_grad=True)
    labels = torch.tensor(labels, dtype=torch.float32)
    loss = criterion(codes, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(codes.grad).all() and torch.isfinite(criterion.proxies.grad).all()
    assert loss.item() == pytest.approx(
        reference_hyp2(codes.detach(), labels, criterion.proxies.detach(), 0.5, criterion.zeta), rel=1e-5, abs=1e-6)


def test_zero_codes_do_not_produce_nan():
    criterion = HyP2Loss(3, 8)
    codes = torch.zeros(4, 8, requires_grad=True)
    loss = criterion(codes, torch.tensor([[1.0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(codes.grad).all()


def test_pair_term_only_counts_irrelevant_multi_label_pairs():
    criterion = HyP2Loss(4, 4, beta=1.0, zeta=0.0)
    proxy_only = HyP2Loss(4, 4, beta=0.0, zeta=0.0)
    proxy_only.load_state_dict(criterion.state_dict())
    same = torch.tensor([[1.0, 0, 0, 0]] * 3)  # identical codes: every pair has cosine 1
    # rows 0 and 1 share nothing but row 2 has a single label: only the pair (0, 1) counts.
    labels = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]])
    assert criterion(same, labels).item() == pytest.approx(proxy_only(same, labels).item() + 1.0)


def test_build_loss_by_name():
    assert isinstance(build_loss("hyp2", 20, 48, beta=0.0), HyP2Loss)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        build_loss("nope", 20, 48)
