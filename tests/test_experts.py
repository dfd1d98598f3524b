"""--experts: E hash heads on one trunk trained with the collaborative (ECL) terms of docs/METHOD.md §8.2.

Each term is checked against a loop over heads, samples and classes written from the formulas in
docs/METHOD.md; the CLI round trip checks that a multi-head checkpoint re-tests to the same mAP.
"""
import math

import numpy as np
import pytest
import torch

import retrieval
from loss import CollaborativeExpertsLoss, build_experts_loss, build_loss
from network import build_network
from test_loss import reference_hyp2
from utils.errors import UserError

CLASSES, BITS = 5, 8


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _sigmoid(t):
    return 1 / (1 + math.exp(-t))


def experts(num_heads=3, **settings):
    torch.manual_seed(0)
    return build_experts_loss(num_heads, lambda: build_loss("hyp2", CLASSES, BITS), **settings)


def head_batch(seed, size=6, heads=3):
    rng = np.random.default_rng(seed)
    codes = torch.tensor(rng.standard_normal((size, heads, BITS)), dtype=torch.float32)
    labels = torch.tensor((rng.random((size, CLASSES)) < 0.4).astype(np.float32))
    labels[0] = 0  # a sample without labels
    labels[1, :3] = 1
    return codes, labels


def probabilities_loop(codes, proxies, margin, temperature):
    return [[_sigmoid((_cos(x, p) - margin) / temperature) for p in proxies] for x in codes]


def test_distillation_is_the_weighted_mutual_binary_kl_between_heads():
    criterion = experts(distill=1.0, reweight=0.0, temperature=0.3)
    codes, labels = head_batch(1)
    margin = (1 + criterion.heads[0].zeta) / 2
    probs = [probabilities_loop(codes[:, e].tolist(), criterion.heads[e].proxies.tolist(), margin, 0.3)
             for e in range(3)]
    weights = [0.5, 1.0, 1.5, 0.8, 1.2]
    pair_terms = []
    for e in range(3):
        for f in range(3):
            if e == f:
                continue
            total = 0.0
            for i in range(len(codes)):
                for c in range(CLASSES):
                    t, s = probs[f][i][c], probs[e][i][c]
                    total += weights[c] * (t * math.log(t / s) + (1 - t) * math.log((1 - t) / (1 - s)))
            pair_terms.append(total / (len(codes) * CLASSES))
    got = criterion.distillation(criterion.probabilities(codes), torch.tensor(weights))
    assert got.item() == pytest.approx(sum(pair_terms) / len(pair_terms), rel=1e-4)


def test_feature_distillation_is_one_minus_cosine_between_heads():
    criterion = experts(feature=1.0)
    codes, _ = head_batch(2)
    terms = [sum(1 - _cos(codes[i, e].tolist(), codes[i, f].tolist()) for i in range(len(codes))) / len(codes)
             for e in range(3) for f in range(3) if e != f]
    assert criterion.feature_distillation(codes).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_contrastive_term_is_multi_positive_info_nce_against_the_negatives():
    criterion = experts(contrastive=1.0, tau=0.1)
    codes, labels = head_batch(3)
    per_head = []
    for e, head in enumerate(criterion.heads):
        proxies, samples = head.proxies.tolist(), []
        for x, y in zip(codes[:, e].tolist(), labels.tolist()):
            positives = [c for c in range(CLASSES) if y[c] > 0]
            if not positives:
                continue  # samples without labels do not count
            z = [_cos(x, p) / 0.1 for p in proxies]
            negatives = sum(math.exp(z[c]) for c in range(CLASSES) if y[c] == 0)
            samples.append(-sum(math.log(math.exp(z[c]) / (math.exp(z[c]) + negatives)) for c in positives)
                           / len(positives))
        per_head.append(sum(samples) / len(samples))
    assert criterion.contrastive_term(codes, labels).item() == pytest.approx(sum(per_head) / 3, rel=1e-4)


def test_class_weights_grow_where_distillation_falls_behind_the_labels():
    criterion = experts(distill=1.0, reweight=4.0, ema=0.0)  # ema 0: the scores are this batch's
    codes, labels = head_batch(4)
    probabilities = criterion.probabilities(codes)
    features = codes.mean(dim=1)
    with torch.no_grad():
        label_probe = torch.sigmoid(criterion.label_probe(features)).tolist()
        distill_probe = torch.sigmoid(criterion.distill_probe(features)).tolist()
    weights, _ = criterion.class_weights(codes, labels, probabilities)
    raw = []
    for c in range(CLASSES):
        holders = [i for i in range(len(codes)) if labels[i, c] > 0]
        if holders:
            label_score = sum(label_probe[i][c] for i in holders) / len(holders)
            distill_score = sum(distill_probe[i][c] for i in holders) / len(holders)
        else:
            label_score = distill_score = 0.5  # never seen: the initial scores
        raw.append(1 + 4.0 * max(0.0, label_score - distill_score))
    mean = sum(raw) / len(raw)
    assert weights.tolist() == pytest.approx([w / mean for w in raw], rel=1e-5)
    assert not weights.requires_grad


def test_total_is_the_heads_losses_plus_the_weighted_terms():
    criterion = experts(distill=0.7, reweight=0.0, feature=0.3, contrastive=0.2).eval()
    codes, labels = head_batch(5)
    heads = sum(reference_hyp2(codes[:, e], labels, head.proxies.detach(), 0.5, head.zeta)
                for e, head in enumerate(criterion.heads))
    ones = torch.ones(CLASSES)
    expected = (heads + 0.7 * criterion.distillation(criterion.probabilities(codes), ones).item()
                + 0.3 * criterion.feature_distillation(codes).item()
                + 0.2 * criterion.contrastive_term(codes, labels).item())
    assert criterion(codes, labels).item() == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_every_head_its_proxies_and_the_trunk():
    torch.manual_seed(0)
    network = build_network("small", BITS, experts=3).train()
    criterion = experts(distill=1.0, feature=1.0, contrastive=1.0)
    images = torch.randn(6, 3, 32, 32)
    _, labels = head_batch(6)
    criterion(network(images), labels).backward()
    for e in range(3):
        assert network.heads[e].weight.grad.abs().sum() > 0
        assert criterion.heads[e].proxies.grad.abs().sum() > 0
    assert network.trunk.features[0].weight.grad.abs().sum() > 0
    assert criterion.label_probe.weight.grad.abs().sum() > 0 and criterion.distill_probe.weight.grad.abs().sum() > 0


def test_inference_uses_one_head_or_the_mean_of_the_heads():
    torch.manual_seed(0)
    network = build_network("small", BITS, experts=2, inference_head=1)
    images = torch.randn(4, 3, 32, 32)
    network.train()
    assert network(images).shape == (4, 2, BITS)
    network.eval()
    per_head = torch.stack([head(network.trunk(images)) for head in network.heads])
    assert torch.allclose(network(images), per_head[1])
    network.inference_head = "mean"
    assert torch.allclose(network(images), (per_head[0] + per_head[1]) / 2)


def test_one_head_keeps_the_papers_checkpoint_format():
    torch.manual_seed(0)
    plain = set(build_network("small", BITS).state_dict())
    assert set(build_network("small", BITS, experts=1).state_dict()) == plain
    multi = set(build_network("small", BITS, experts=2).state_dict())
    assert {"heads.0.weight", "heads.1.weight", "trunk.features.0.weight"} <= multi


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="at least 2 heads"):
        CollaborativeExpertsLoss([build_loss("hyp2", CLASSES, BITS)])
    with pytest.raises(ValueError, match="need a proxy loss"):
        CollaborativeExpertsLoss([build_loss("dpsh", CLASSES, BITS)] * 2)
    with pytest.raises(UserError, match="--inference_head 1 needs --experts"):
        retrieval.check_flags(retrieval.get_args_parser().parse_args(["--inference_head", "1"]))
    with pytest.raises(UserError, match="--inference_head 2: the heads are 0 to 1"):
        retrieval.check_flags(retrieval.get_args_parser().parse_args(["--experts", "2", "--inference_head", "2"]))


TINY = ["--dataset", "digits", "--backbone", "small", "--hash_bit", "16", "--subset", "300", "--batch_size", "50",
        "--epochs", "1", "--device", "cpu", "--no_progress", "--imbalance", "10", "--experts", "2",
        "--ecl_distill", "1", "--ecl_feature", "1", "--ecl_contrastive", "0.5"]


def run(argv):
    return retrieval.main(retrieval.get_args_parser().parse_args(argv))


def test_multi_head_checkpoint_round_trips_and_retests_to_the_same_map(tmp_path, capsys):
    summary = run(TINY + ["--output_dir", str(tmp_path)])
    prefix = tmp_path / "digits_lt10_small_16_hyp2_ecl2"
    state = torch.load(prefix.with_suffix(".ckpt"), weights_only=True)
    assert state["heads.1.weight"].shape == (16, 128)
    assert set(summary["long_tail"]["buckets"]) == {"head", "medium", "tail"}
    prefix.with_suffix(".codes.npz").unlink()  # so --test encodes with the reloaded network
    tested = run(TINY + ["--output_dir", str(tmp_path), "--test"])
    assert tested["map"] == summary["map"] and not tested["metrics"]["run"]["codes_from_cache"]
    assert tested["metrics"]["long_tail"] == summary["long_tail"]
    mean_heads = run(TINY + ["--output_dir", str(tmp_path), "--test", "--inference_head", "mean"])
    assert not mean_heads["metrics"]["run"]["codes_from_cache"]  # another reading of the same checkpoint
    with pytest.raises(UserError, match="no checkpoint"):  # without --experts, the run is another one
        run([flag for flag in TINY if flag not in ("--experts", "2")] + ["--output_dir", str(tmp_path), "--test"])
