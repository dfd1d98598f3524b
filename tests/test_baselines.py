"""The baseline losses against plain-loop implementations of their docs/METHOD.md §6 formulas (one
entry or pair at a time, written here independently of the loss package), plus gradients, edge cases, state."""
import math

import numpy as np
import pytest
import torch

from loss import LOSSES, PROXY_LOSSES, ProxyLoss, build_loss, hash_centres
from test_loss import _cos, random_labels, reference_hyp2
from hashing.hadamard import hadamard_matrix


def _shares(y_a, y_b):
    return any(a > 0 and b > 0 for a, b in zip(y_a, y_b))


def _sign(value):
    return (value > 0) - (value < 0)


def _softplus(value):
    return math.log1p(math.exp(-abs(value))) + max(value, 0.0)


def _distinct_pairs(count):
    return [(i, k) for i in range(count) for k in range(count) if i != k]


def _balanced_mean(losses_and_similar):
    """HashNet/DCH weighting: |S|/|S1| on similar pairs, |S|/|S0| on dissimilar ones, then the mean."""
    total = len(losses_and_similar)
    similar = sum(1 for _, s in losses_and_similar if s)
    dissimilar = total - similar
    weighted = [value * (total / similar if s else total / dissimilar) for value, s in losses_and_similar]
    return sum(weighted) / total


def reference_proxy_anchor(codes, labels, proxies, alpha, delta):
    pull, anchors, push = 0.0, 0, 0.0
    for j, proxy in enumerate(proxies):
        positives = [math.exp(-alpha * (_cos(x, proxy) - delta)) for x, y in zip(codes, labels) if y[j] > 0]
        negatives = [math.exp(alpha * (_cos(x, proxy) + delta)) for x, y in zip(codes, labels) if y[j] <= 0]
        if positives:
            anchors += 1
            pull += math.log(1 + sum(positives))
        push += math.log(1 + sum(negatives))
    return pull / max(anchors, 1) + push / len(proxies)


def reference_hhf(codes, labels, proxies, alpha, delta, quantization, zeta):
    pull, anchors, push = 0.0, 0, 0.0
    for j, proxy in enumerate(proxies):
        positives = [math.exp(alpha * max(1 - delta - _cos(x, proxy), 0)) - 1
                     for x, y in zip(codes, labels) if y[j] > 0]
        negatives = [math.exp(alpha * max(_cos(x, proxy) - zeta - delta, 0)) - 1
                     for x, y in zip(codes, labels) if y[j] <= 0]
        if positives:
            anchors += 1
            pull += math.log(1 + sum(positives))
        push += math.log(1 + sum(negatives))
    penalty = sum((_sign(v) - v) ** 2 for x in codes for v in x)
    return pull / max(anchors, 1) + push / len(proxies) + quantization * penalty


def reference_pairwise_likelihood(codes, labels, quantization, error):
    terms = []
    for i, k in _distinct_pairs(len(codes)):
        theta = 0.5 * sum(a * b for a, b in zip(codes[i], codes[k]))
        terms.append(math.log(1 + math.exp(theta)) - _shares(labels[i], labels[k]) * theta)
    entries = [error(v) for x in codes for v in x]
    return sum(terms) / len(terms) + quantization * sum(entries) / len(entries)


def reference_dhn(codes, labels, quantization):
    return reference_pairwise_likelihood(codes, labels, quantization, lambda v: math.log(math.cosh(abs(v) - 1)))


def reference_dpsh(codes, labels, quantization):
    return reference_pairwise_likelihood(codes, labels, quantization, lambda v: (v - _sign(v)) ** 2)


def reference_hashnet(codes, labels, alpha, step, epoch):
    scale = math.sqrt((epoch - 1) // step + 1)
    relaxed = [[math.tanh(scale * v) for v in x] for x in codes]
    pairs = []
    for i, k in _distinct_pairs(len(codes)):
        theta = alpha * sum(a * b for a, b in zip(relaxed[i], relaxed[k]))
        similar = _shares(labels[i], labels[k])
        pairs.append((math.log(1 + math.exp(theta)) - similar * theta, similar))
    return _balanced_mean(pairs)


def reference_dch(codes, labels, gamma, quantization, bits):
    def distance(a, b):
        return bits / 2 * (1 - min(_cos(a, b), 0.99))

    pairs = []
    for i, k in _distinct_pairs(len(codes)):
        d = distance(codes[i], codes[k])
        similar = _shares(labels[i], labels[k])
        pairs.append((similar * math.log(d / gamma) + math.log(1 + gamma / d), similar))
    quantization_terms = [math.log(1 + distance([abs(v) for v in x], [1.0] * bits) / gamma) for x in codes]
    return _balanced_mean(pairs) + quantization * sum(quantization_terms) / len(codes)


def reference_csq(codes, labels, centres, tie_breaker, quantization):
    bce, penalty, count = 0.0, 0.0, 0
    for x, y in zip(codes, labels):
        for b, value in enumerate(x):
            summed = sum(centres[c][b] for c in range(len(y)) if y[c] > 0)
            target = ((tie_breaker[b] if summed == 0 else _sign(summed)) + 1) / 2
            p = (math.tanh(value) + 1) / 2
            bce -= target * math.log(p) + (1 - target) * math.log(1 - p)
            penalty += (abs(math.tanh(value)) - 1) ** 2
            count += 1
    return bce / count + quantization * penalty / count


def reference_idhn(codes, labels, scale, gamma, quantization, bits):
    relaxed = [[v / (1 + abs(v)) for v in x] for x in codes]
    terms = []
    for i, k in _distinct_pairs(len(codes)):
        norm_i, norm_k = math.sqrt(sum(v > 0 for v in labels[i])), math.sqrt(sum(v > 0 for v in labels[k]))
        common = sum(1 for a, b in zip(labels[i], labels[k]) if a > 0 and b > 0)
        s = common / (norm_i * norm_k) if norm_i and norm_k else 0.0
        ip = sum(a * b for a, b in zip(relaxed[i], relaxed[k]))
        if s > 0.99 or s < 0.01:
            theta = scale * ip / bits
            terms.append(math.log(1 + math.exp(theta)) - s * theta)
        else:
            terms.append(gamma * bits * ((ip / bits + 1) / 2 - s) ** 2)
    entries = [abs(abs(v) - 1) for x in relaxed for v in x]
    return sum(terms) / len(terms) + quantization * sum(entries) / len(entries)


def reference_orthohash(codes, labels, codebook, scale, margin):
    losses = []
    for x, y in zip(codes, labels):
        positives = sum(1 for v in y if v > 0)
        if not positives:
            continue
        logits = [scale * (_cos(x, c) - margin * (y[k] > 0)) for k, c in enumerate(codebook)]
        top = max(logits)
        log_normaliser = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(-sum((y[k] > 0) / positives * (logits[k] - log_normaliser) for k in range(len(y))))
    return sum(losses) / len(losses)


def reference(name, criterion, codes, labels):
    """The loop value of `criterion` (its hyper-parameters and state) on codes and labels."""
    codes, labels = codes.tolist(), labels.tolist()
    settings = criterion.hyperparameters()
    bits = criterion.hash_bit
    if name == "hyp2":
        return reference_hyp2(torch.tensor(codes), torch.tensor(labels), criterion.proxies.detach(),
                              settings["beta"], settings["zeta"])
    if name == "proxy_anchor":
        return reference_proxy_anchor(codes, labels, criterion.proxies.tolist(), settings["alpha"], settings["delta"])
    if name == "hhf":
        return reference_hhf(codes, labels, criterion.proxies.tolist(), settings["alpha"], settings["delta"],
                             settings["quantization"], settings["zeta"])
    if name == "dhn":
        return reference_dhn(codes, labels, settings["quantization"])
    if name == "dpsh":
        return reference_dpsh(codes, labels, settings["quantization"])
    if name == "hashnet":
        assert settings["scale"] == 1  # before any set_epoch: the first epoch
        return reference_hashnet(codes, labels, settings["alpha"], settings["step"], epoch=1)
    if name == "dch":
        return reference_dch(codes, labels, settings["gamma"], settings["quantization"], bits)
    if name == "csq":
        return reference_csq(codes, labels, criterion.centres.tolist(), criterion.tie_breaker.tolist(),
                             settings["quantization"])
    if name == "idhn":
        return reference_idhn(codes, labels, settings["scale"], settings["gamma"], settings["quantization"], bits)
    if name == "orthohash":
        return reference_orthohash(codes, labels, criterion.codebook.tolist(), settings["scale"], settings["margin"])
    raise AssertionError(f"no reference for {name}")


def batch(seed, size=10, classes=6, bits=12, scale=1.0):
    rng = np.random.default_rng(seed)
    codes = torch.tensor(rng.standard_normal((size, bits)) * scale, dtype=torch.float32)
    labels = torch.tensor(random_labels(rng, size, classes, 0.35))
    labels[2] = 0
    labels[2, :3] = 1  # a three-label row, so soft similarities and irrelevant pairs occur
    return codes, labels


def test_every_registered_loss_has_a_reference():
    assert set(LOSSES) == {"hyp2", "proxy_anchor", "hhf", "dhn", "dpsh", "hashnet", "dch", "csq", "idhn",
                           "orthohash"}
    assert PROXY_LOSSES == ["hyp2", "proxy_anchor", "hhf"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_loop_reference(name, seed):
    codes, labels = batch(seed, scale=[1.0, 0.3, 2.5][seed])
    # The code table gives zeta = 0 here; a non-zero zeta shows that it enters where it should.
    settings = {"zeta": 0.25} if LOSSES[name].uses_zeta else {}
    criterion = build_loss(name, labels.shape[1], codes.shape[1], **settings)
    expected = reference(name, criterion, codes, labels)
    assert criterion(codes, labels).item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_hashnet_scale_follows_the_epoch():
    criterion = build_loss("hashnet", 6, 12, step=3)
    codes, labels = batch(0)
    values = []
    for epoch, scale in [(1, 1.0), (3, 1.0), (4, math.sqrt(2)), (7, math.sqrt(3))]:
        criterion.set_epoch(epoch)
        assert criterion.scale.item() == pytest.approx(scale)
        values.append(criterion(codes, labels).item())
        assert values[-1] == pytest.approx(reference_hashnet(codes.tolist(), labels.tolist(), 0.1, 3, epoch), rel=1e-5)
    assert values[0] == values[1] != values[2]


def test_proxy_anchor_hand_worked():
    # One sample x = (1, 0) with label 0; proxies (1, 0) and (0, 1): c = [1, 0]; alpha 1, delta 0.
    # pull: log(1 + e^{-1}); push (proxy 1 only): log(1 + e^0) = log 2; |P+| = 1, C = 2.
    criterion = build_loss("proxy_anchor", 2, 2, alpha=1.0, delta=0.0)
    with torch.no_grad():
        criterion.proxies.copy_(torch.eye(2))
    value = criterion(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])).item()
    assert value == pytest.approx(math.log(1 + math.exp(-1)) + math.log(2) / 2)


def test_csq_hand_worked():
    # Zero codes: p = 1/2 for every bit, so BCE = log 2 whatever the centre; |tanh 0| - 1 = -1.
    criterion = build_loss("csq", 4, 8, quantization=0.5)
    value = criterion(torch.zeros(3, 8), torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])).item()
    assert value == pytest.approx(math.log(2) + 0.5)


def test_csq_multi_label_centres_and_ties():
    criterion = build_loss("csq", 4, 8, seed=3)
    centres, tie = criterion.centres, criterion.tie_breaker
    labels = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 0], [1.0, 1, 1, 0], [0, 0, 0, 0]])
    targets = criterion.target_centres(labels)
    assert torch.equal(targets[0], centres[0])
    for b in range(8):
        pair = centres[0, b] + centres[1, b]
        assert targets[1, b] == (tie[b] if pair == 0 else torch.sign(pair))
    assert torch.equal(targets[2], torch.sign(centres[:3].sum(0)))  # three +-1 values never tie
    assert torch.equal(targets[3], tie)


@pytest.mark.parametrize("bits", [12, 16, 24, 48, 64])
def test_csq_centres_are_hadamard_rows(bits):
    centres = hash_centres(10, bits, torch.Generator().manual_seed(0))
    distances = (bits - centres @ centres.T) / 2
    off_diagonal = distances[~torch.eye(10, dtype=torch.bool)]
    assert set(off_diagonal.tolist()) <= {bits / 2, float(bits)}  # orthogonal rows, or a row and its negative
    assert torch.equal(centres[0], torch.from_numpy(hadamard_matrix(bits)[0]).float())


def brute_force_min_distance(rows):
    rows = rows.tolist()
    return min(sum(a != b for a, b in zip(rows[i], rows[j])) for i in range(len(rows)) for j in range(i))


def test_csq_random_centres_when_hadamard_runs_out():
    centres = hash_centres(20, 6, torch.Generator().manual_seed(0))  # no Hadamard matrix of order 6: all random
    assert centres.shape == (20, 6) and len(torch.unique(centres, dim=0)) == 20
    centres = hash_centres(40, 16, torch.Generator().manual_seed(0))  # 32 Hadamard rows, 8 random ones
    assert torch.equal(centres[:16], torch.from_numpy(hadamard_matrix(16)).float())
    assert torch.equal(centres[16:32], -centres[:16]) and len(torch.unique(centres, dim=0)) == 40
    every_3_bit_code = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * 3)
    assert torch.equal(hash_centres(8, 3, torch.Generator()).unique(dim=0), every_3_bit_code)
    with pytest.raises(ValueError, match="9 classes need 9 distinct centres, more than the 8 codes of 3 bits"):
        hash_centres(9, 3, torch.Generator())


@pytest.mark.parametrize("bits", [12, 24, 36, 48, 64])
def test_csq_centres_are_distinct_and_the_log_has_their_minimum_distance(bits):
    for classes in (20, 21, 38, 81):
        criterion = build_loss("csq", classes, bits, seed=1)
        assert len(torch.unique(criterion.centres, dim=0)) == classes
        assert criterion.hyperparameters()["min_centre_distance"] == brute_force_min_distance(criterion.centres)
        if 2 * bits >= classes:  # Hadamard rows only: orthogonal, or a row and its negative
            assert criterion.hyperparameters()["min_centre_distance"] == bits // 2


def test_hadamard_orders():
    for order in [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 48, 72, 96, 128]:
        matrix = hadamard_matrix(order)
        assert np.array_equal(matrix @ matrix.T, order * np.eye(order))
        assert set(np.unique(matrix)) <= {-1, 1}
    assert hadamard_matrix(6) is None and hadamard_matrix(3) is None and hadamard_matrix(52) is None


@pytest.mark.parametrize("name", ["csq", "orthohash"])
def test_fixed_targets_come_from_the_seed(name):
    buffers = {seed: build_loss(name, 10, 12, seed=seed).state_dict() for seed in (0, 0, 1)}
    again = build_loss(name, 10, 12, seed=0).state_dict()
    assert all(torch.equal(buffers[0][key], again[key]) for key in again)
    if name == "orthohash":  # CSQ's 12-bit centres are Hadamard rows: only its tie vector is random
        assert not torch.equal(buffers[0]["codebook"], buffers[1]["codebook"])
        codebook = buffers[0]["codebook"]
        assert len(torch.unique(codebook, dim=0)) == 10 and set(codebook.unique().tolist()) == {-1.0, 1.0}
    else:
        assert not torch.equal(buffers[0]["tie_breaker"], buffers[1]["tie_breaker"])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_codes_and_learnable_state(name):
    codes, labels = batch(4)
    codes.requires_grad_(True)
    criterion = build_loss(name, labels.shape[1], codes.shape[1])
    criterion(codes, labels).backward()
    assert codes.grad.abs().sum() > 0
    learnable = list(criterion.parameters())
    assert (len(learnable) == 1) == (name in PROXY_LOSSES)
    for parameter in learnable:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


EDGE_CASES = {
    "single-label batch": (lambda: torch.randn(4, 8), torch.eye(4, 5)),
    "class absent from the batch": (lambda: torch.randn(3, 8), torch.tensor([[1.0, 1, 0, 0, 0], [0, 1, 0, 0, 0],
                                                                            [1, 0, 0, 0, 0]])),
    "all-identical codes": (lambda: torch.ones(4, 8), torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 0],
                                                                   [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]])),
    "all-negative label row": (lambda: torch.randn(3, 8), torch.tensor([[0.0, 0, 0, 0, 0], [0, 1, 1, 0, 0],
                                                                       [1, 0, 0, 0, 0]])),
    "all-negative batch": (lambda: torch.randn(3, 8), torch.zeros(3, 5)),
    "zero codes": (lambda: torch.zeros(3, 8), torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0]])),
    "large codes": (lambda: 1e3 * torch.randn(3, 8), torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 0],
                                                                  [1, 1, 1, 0, 0]])),
    "one sample": (lambda: torch.randn(1, 8), torch.tensor([[1.0, 1, 0, 0, 0]])),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("name", sorted(LOSSES) + ["hyp2_hpl2"])
def test_edge_cases_are_finite(name, case):
    from loss import HierarchicalProxyLoss
    make_codes, labels = EDGE_CASES[case]
    codes = make_codes().requires_grad_(True)
    criterion = (HierarchicalProxyLoss(build_loss("hyp2", 5, 8), 2) if name == "hyp2_hpl2"
                 else build_loss(name, 5, 8))
    loss = criterion(codes, labels)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(codes.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in criterion.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_state_round_trips_through_a_checkpoint(name, tmp_path):
    codes, labels = batch(5)
    torch.manual_seed(1)
    original = build_loss(name, 6, 12, seed=1)  # the seed reaches only the losses with fixed random targets
    if hasattr(original, "set_epoch"):
        original.set_epoch(25)
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.add_(0.1)
    torch.save(original.state_dict(), tmp_path / "loss.ckpt")

    torch.manual_seed(2)
    restored = build_loss(name, 6, 12)
    restored.load_state_dict(torch.load(tmp_path / "loss.ckpt", weights_only=True))
    assert restored(codes, labels).item() == original(codes, labels).item()
    for key, tensor in original.state_dict().items():
        assert torch.equal(restored.state_dict()[key], tensor)
    assert isinstance(original, ProxyLoss) == ("proxies" in original.state_dict())


def test_hyperparameters_are_reported_and_default_to_the_published_values():
    published = {
        "hyp2": {"beta": 0.5}, "proxy_anchor": {"alpha": 32.0, "delta": 0.1},
        "hhf": {"alpha": 16.0, "delta": 0.2, "quantization": 0.001},
        "dhn": {"quantization": 0.1, "gradient_factors": 2, "memory": 0},
        "dpsh": {"quantization": 0.1, "gradient_factors": 2, "memory": 0},
        "hashnet": {"alpha": 0.1, "step": 20, "alpha_over_bits": 0.0, "similar_weight": 0.0},
        "dch": {"gamma": 20.0, "quantization": 0.1}, "csq": {"quantization": 1e-4},
        "idhn": {"scale": 5.0, "gamma": 0.1, "quantization": 0.1}, "orthohash": {"scale": 8.0, "margin": 0.2},
    }
    for name, expected in published.items():
        settings = build_loss(name, 20, 48).hyperparameters()
        assert {key: settings[key] for key in expected} == expected
        assert [h.name for h in LOSSES[name].HYPERPARAMETERS] == list(expected)
        assert all(h.help for h in LOSSES[name].HYPERPARAMETERS)
    assert build_loss("hhf", 20, 48).hyperparameters()["zeta"] == 0.0  # the code table's value for (48, 20)
    assert build_loss("proxy_anchor", 20, 48, alpha=8).hyperparameters()["alpha"] == 8
    with pytest.raises(TypeError, match="ProxyAnchorLoss has no hyper-parameter beta"):
        build_loss("proxy_anchor", 20, 48, beta=0.5)


@pytest.mark.parametrize("seed", range(3))
def test_reference_batches_are_not_degenerate(seed):
    # The references above only prove something if the batches hold similar, dissimilar and soft pairs.
    rows = batch(seed)[1].tolist()
    assert {_shares(rows[i], rows[k]) for i, k in _distinct_pairs(len(rows))} == {True, False}
    assert max(sum(row) for row in rows) >= 2 and min(sum(row) for row in rows) == 0
