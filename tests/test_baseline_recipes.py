"""The baselines as their authors ran them (docs/METHOD.md §6): the pair losses' one-factor gradient,
HashNet's original scale and weighting, the recipe files of configs/authors/ and their reader, and
benchmarks/compare.py --baseline_recipe. References are plain loops over the formulas, written here."""
import math
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import retrieval
from cli_runs import load_script, small_digits_failure
from loss import build_loss
from test_baselines import reference_hashnet
from utils.config import read_config
from utils.errors import UserError

compare = load_script("benchmarks/compare.py")
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "authors"


def shares(y_a, y_b):
    return any(a > 0 and b > 0 for a, b in zip(y_a, y_b))


def ordered_pairs(count):
    return [(i, k) for i in range(count) for k in range(count) if i != k]


def sample_batch(seed, size=9, classes=5, bits=12):
    rng = np.random.default_rng(seed)
    codes = torch.tensor(rng.standard_normal((size, bits)), dtype=torch.float32)
    labels = torch.tensor((rng.random((size, classes)) < 0.3).astype(np.float32))
    labels[0] = 0
    labels[0, :2] = 1
    labels[1] = labels[0]  # at least one similar pair
    return codes, labels


def reference_pair_gradient(codes, labels, factors):
    """d/du of mean_{i != k} [log(1 + e^theta_ik) - s_ik theta_ik], theta_ik = u_i.u_k / 2, through the first
    factor of each product (factors=1) or through both (factors=2)."""
    codes, labels = codes.tolist(), labels.tolist()
    pairs = ordered_pairs(len(codes))
    gradient = [[0.0] * len(codes[0]) for _ in codes]
    for i, k in pairs:
        theta = 0.5 * sum(a * b for a, b in zip(codes[i], codes[k]))
        slope = 1 / (1 + math.exp(-theta)) - shares(labels[i], labels[k])
        for bit in range(len(codes[0])):
            gradient[i][bit] += slope * 0.5 * codes[k][bit] / len(pairs)
            if factors == 2:
                gradient[k][bit] += slope * 0.5 * codes[i][bit] / len(pairs)
    return torch.tensor(gradient)


def gradient_and_value(name, codes, labels, **settings):
    codes = codes.clone().requires_grad_(True)
    value = build_loss(name, labels.shape[1], codes.shape[1], **settings)(codes, labels)
    value.backward()
    return codes.grad, value.item()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["dhn", "dpsh"])
def test_one_factor_gives_half_the_pair_gradient(name, seed):
    codes, labels = sample_batch(seed)
    both, value_both = gradient_and_value(name, codes, labels, quantization=0.0)
    one, value_one = gradient_and_value(name, codes, labels, quantization=0.0, gradient_factors=1)
    torch.testing.assert_close(both, reference_pair_gradient(codes, labels, factors=2), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one, reference_pair_gradient(codes, labels, factors=1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one, both / 2, rtol=1e-6, atol=1e-8)  # half, up to float32 summation order
    assert value_one == value_both  # the value does not change, only the gradient's path


@pytest.mark.parametrize("name", ["dhn", "dpsh"])
def test_one_factor_leaves_the_quantisation_gradient_alone(name):
    codes, labels = sample_batch(3)
    both, _ = gradient_and_value(name, codes, labels, quantization=0.3)
    one, _ = gradient_and_value(name, codes, labels, quantization=0.3, gradient_factors=1)
    # What one factor loses is exactly the other factor's half of the pair gradient.
    torch.testing.assert_close(both - one, reference_pair_gradient(codes, labels, factors=1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("value", [0, 3, -1])
def test_gradient_factors_is_one_or_two(value):
    with pytest.raises(ValueError, match=f"gradient_factors is 1 .* or 2 .*, not {value}"):
        build_loss("dpsh", 5, 12, gradient_factors=value)


def reference_hashnet_original(codes, labels, alpha, similar_weight, scale=1.0):
    """thuml/HashNet's pairwise loss: sum over pairs of w_ik [log(1 + e^theta) - s theta] / sum of w_ik with
    theta = alpha tanh(scale x_i).tanh(scale x_k), w = similar_weight on similar pairs and 1 on dissimilar
    ones. (Their code takes theta (1 - s) above theta = 15; |tanh| <= 1 keeps theta <= alpha n = 10 here.)"""
    relaxed = [[math.tanh(scale * v) for v in x] for x in codes.tolist()]
    labels = labels.tolist()
    weighted, total = 0.0, 0.0
    for i, k in ordered_pairs(len(relaxed)):
        theta = alpha * sum(a * b for a, b in zip(relaxed[i], relaxed[k]))
        similar = shares(labels[i], labels[k])
        weight = similar_weight if similar else 1.0
        weighted += weight * (math.log1p(math.exp(theta)) - similar * theta)
        total += weight
    return weighted / total


@pytest.mark.parametrize("bits", [12, 48])
@pytest.mark.parametrize("similar_weight", [1.0, 5.0, 100.0])
def test_hashnet_as_its_authors_code(bits, similar_weight):
    codes, labels = sample_batch(bits, bits=bits)
    criterion = build_loss("hashnet", labels.shape[1], bits, alpha_over_bits=10.0, similar_weight=similar_weight)
    expected = reference_hashnet_original(codes * 3, labels, 10 / bits, similar_weight)
    assert criterion(codes * 3, labels).item() == pytest.approx(expected, rel=1e-5)


def test_hashnet_scale_and_weighting_are_separate_choices():
    codes, labels = sample_batch(7)
    bits = codes.shape[1]
    scaled = build_loss("hashnet", labels.shape[1], bits, alpha_over_bits=10.0)
    assert scaled(codes, labels).item() == pytest.approx(
        reference_hashnet(codes.tolist(), labels.tolist(), 10 / bits, 20, epoch=1), rel=1e-5)
    weighted = build_loss("hashnet", labels.shape[1], bits, similar_weight=5.0)
    weighted.set_epoch(21)  # the continuation applies to both weightings
    assert weighted(codes, labels).item() == pytest.approx(
        reference_hashnet_original(codes, labels, 0.1, 5.0, scale=math.sqrt(2)), rel=1e-5)


def test_hashnet_weight_of_the_batch_ratio_is_half_the_balanced_loss():
    # With c = |S0|/|S1| of the batch, (c sum_S1 + sum_S0) / (c |S1| + |S0|) = (mean_S1 + mean_S0) / 2,
    # and the balanced weights |S|/|S1|, |S|/|S0| give mean_S1 + mean_S0 (docs/METHOD.md §6.4).
    codes, labels = sample_batch(11)
    rows = labels.tolist()
    similar = sum(shares(rows[i], rows[k]) for i, k in ordered_pairs(len(rows)))
    dissimilar = len(ordered_pairs(len(rows))) - similar
    assert similar and dissimilar
    balanced = build_loss("hashnet", labels.shape[1], codes.shape[1])(codes, labels).item()
    ratio = build_loss("hashnet", labels.shape[1], codes.shape[1], similar_weight=dissimilar / similar)
    assert ratio(codes, labels).item() == pytest.approx(balanced / 2, rel=1e-5)


def test_hashnet_original_weighting_with_no_pair_is_zero():
    criterion = build_loss("hashnet", 3, 8, similar_weight=5.0)
    codes = torch.randn(1, 8, requires_grad=True)
    value = criterion(codes, torch.tensor([[1.0, 0, 0]]))
    value.backward()
    assert value.item() == 0 and torch.equal(codes.grad, torch.zeros_like(codes))


@pytest.mark.parametrize("name", ["alpha_over_bits", "similar_weight"])
def test_hashnet_original_settings_are_not_negative(name):
    with pytest.raises(ValueError, match=f"{name} is 0 .* or positive, not -1"):
        build_loss("hashnet", 5, 12, **{name: -1.0})


def test_an_impossible_setting_is_a_one_line_error(tmp_path, capsys):
    code, err = small_digits_failure(["--loss", "dpsh", "--dpsh_gradient_factors", "3", "--epochs", "1",
                                      "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and "gradient_factors is 1" in err and len(err.strip().splitlines()) == 1


# The quantisation weight (--lambda2) of the CSQ authors' published training commands, by backbone and bits.
CSQ_AUTHORS_COMMANDS = {("resnet", 64): 0.05, ("alexnet", 16): 0.001, ("alexnet", 32): 0.001,
                        ("alexnet", 64): 0.0001}


@pytest.mark.parametrize("backbone, bits, expected", [
    *[(backbone, bits, weight) for (backbone, bits), weight in CSQ_AUTHORS_COMMANDS.items()],
    ("resnet", 16, 0.05), ("googlenet", 48, 0.05), ("small", 24, 0.05),  # ResNet-50's for other backbones
    ("alexnet", 12, 0.001), ("alexnet", 48, 0.001), ("alexnet", 128, 0.0001),  # between commands: below 64 or not
])
def test_csq_recipe_follows_backbone_and_bits(backbone, bits, expected):
    path = compare.authors_recipe("csq", backbone, bits)
    assert read_config(path) == {"loss": "csq", "csq_quantization": expected}
    assert compare.recipe_flags(path, "csq") == ["--csq_quantization", str(expected)]


def test_recipes_of_the_other_baselines():
    expected = {"dpsh": {"dpsh_gradient_factors": 1}, "dhn": {"dhn_gradient_factors": 1},
                "hashnet": {"hashnet_alpha_over_bits": 10.0, "hashnet_similar_weight": 1.0},
                "proxy_anchor": {"proxy_anchor_alpha": 16.0, "proxy_anchor_delta": 0.1}}
    for loss, values in expected.items():
        assert read_config(compare.authors_recipe(loss, "small", 24)) == {"loss": loss, **values}
    for loss in ("hyp2", "hhf", "dch", "idhn", "orthohash"):  # the project's loss is the authors'
        assert compare.authors_recipe(loss, "alexnet", 48) is None


def test_every_recipe_file_is_used_and_sets_flags_off_their_default():
    used = {compare.authors_recipe(loss, backbone, bits) for loss in compare.RECIPE_LOSSES
            for backbone in ("alexnet", "resnet") for bits in (16, 64)}
    assert used == set(RECIPES.glob("*.yaml"))
    defaults = retrieval.get_args_parser().parse_args([])
    for path in used:
        values = read_config(path)
        assert path.read_text().startswith("# ")  # where the values come from
        args = retrieval.get_args_parser().parse_args(["--loss", values["loss"],
                                                       *compare.recipe_flags(path, values["loss"])])
        changed = [key for key in values if getattr(args, key) != getattr(defaults, key)]
        assert changed and set(changed) <= set(values)
        assert all(getattr(args, key) == value for key, value in values.items())


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_config_returns_the_mapping(tmp_path):
    path = write(tmp_path, "# from somewhere\nloss: csq\ncsq_quantization: 0.05\nbits: [12, 24]\nno_save: true\n"
                           "weights: null\n")
    assert read_config(path) == {"loss": "csq", "csq_quantization": 0.05, "bits": [12, 24], "no_save": True,
                                 "weights": None}
    assert read_config(write(tmp_path, "# comments only\n", "empty.yaml")) == {}


@pytest.mark.parametrize("text, message", [
    ("- 1\n- 2\n", "holds a list, not a mapping"),
    ("just text\n", "holds a str, not a mapping"),
    ("lr: {value: 1}\n", "lr holds a mapping"),
    ("bits: [12, [24]]\n", "bits holds a list"),
    ("seed: 2020-01-01\n", "seed holds a date"),
    ("1: x\n", "key 1 is an int, not a flag name"),
    ("lr: 0.1\nlr: 0.2\n", "line 2.*key 'lr' is given twice"),
    ("lr: [0.1\n", "is not valid YAML"),
    ("lr: !!python/object:os.system x\n", "is not valid YAML"),
])
def test_read_config_refuses_other_shapes_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=message) as error:
        read_config(path)
    assert str(path) in str(error.value)


def test_read_config_refuses_what_is_not_a_small_regular_file(tmp_path):
    with pytest.raises(UserError, match="is a folder, not a regular file"):
        read_config(tmp_path)
    os.mkfifo(tmp_path / "pipe.yaml")
    with pytest.raises(UserError, match="is a FIFO"):
        read_config(tmp_path / "pipe.yaml")
    with pytest.raises(UserError, match="does not exist"):
        read_config(tmp_path / "missing.yaml")
    big = write(tmp_path, "# " + "x" * 2 ** 20 + "\nlr: 0.1\n", "big.yaml")
    with pytest.raises(UserError, match="more than the 1.0 MiB"):
        read_config(big)


def test_recipe_for_another_loss_is_refused(tmp_path):
    with pytest.raises(UserError, match="is for --loss dhn, not dpsh"):
        compare.recipe_flags(write(tmp_path, "loss: dhn\ndhn_gradient_factors: 1\n"), "dpsh")


@pytest.mark.parametrize("mode, expected", [
    ("ours", ["hyp2", "dpsh", "proxy_anchor_hpl4"]),
    ("authors", ["hyp2", "dpsh_authors", "proxy_anchor_hpl4_authors"]),
    ("both", ["hyp2", "dpsh", "dpsh_authors", "proxy_anchor_hpl4", "proxy_anchor_hpl4_authors"]),
])
def test_rows_per_baseline_recipe(mode, expected):
    assert compare.row_labels(["hyp2", "dpsh", "proxy_anchor_hpl4"], mode) == expected


def test_authors_rows_apply_the_recipe_then_the_loss_args(tmp_path):
    options = compare.get_args_parser().parse_args(["--output_dir", str(tmp_path), "--baseline_recipe", "both"])
    ours = compare.cell_args(options, "csq", 24, 0)
    authors = compare.cell_args(options, "csq_authors", 24, 0)
    assert (ours.loss, authors.loss) == ("csq", "csq")
    assert (ours.csq_quantization, authors.csq_quantization) == (1e-4, 0.05)  # small backbone: ResNet-50's
    assert Path(authors.output_dir).name == "csq_authors_24bit_seed0" != Path(ours.output_dir).name
    assert compare.cell_args(options, "csq_authors", 24, 0, ["--csq_quantization", "0.2"]).csq_quantization == 0.2
    hierarchical = compare.cell_args(options, "proxy_anchor_hpl4_authors", 24, 0)
    assert (hierarchical.loss, hierarchical.hierarchy, hierarchical.proxy_anchor_alpha) == ("proxy_anchor", 4, 16.0)
    options.backbone = "alexnet"
    assert compare.cell_args(options, "csq_authors", 64, 0).csq_quantization == 0.0001
    assert compare.paper_map("flickr", "csq_authors", 24) == compare.paper_map("flickr", "csq", 24) == .819


def test_tables_name_the_recipes_of_the_authors_rows():
    options = Namespace(dataset="digits", backbone="alexnet", bits=[32, 64], seeds=[0], epochs=10, eval_every=10,
                        subset=0, loss_args=[])
    rows = [{"loss": label, "hash_bit": bits, "runs": 0, "paper_map": None}
            for label in ("csq", "csq_authors", "dpsh_authors") for bits in (32, 64)]
    table = compare.render_markdown(options, ["csq", "csq_authors", "dpsh_authors"], rows, "cmd")
    assert ("csq `--csq_quantization 0.001` (csq_alexnet.yaml); csq `--csq_quantization 0.0001` "
            "(csq_alexnet_64bit.yaml); dpsh `--dpsh_gradient_factors 1` (dpsh.yaml)") in table
    assert "| csq_authors | — | — |" in table


def test_both_variants_train_side_by_side(tmp_path):
    summary = compare.main(["--losses", "dpsh", "--bits", "8", "--seeds", "0", "--epochs", "1", "--subset", "40",
                            "--device", "cpu", "--output_dir", str(tmp_path), "--baseline_recipe", "both",
                            "--batch_size", "20"])
    assert summary["trained"] == 2 and not summary["failed"]
    assert [row["loss"] for row in summary["rows"]] == ["dpsh", "dpsh_authors"]
    table = (tmp_path / "compare_digits_small.md").read_text()
    assert "| dpsh | " in table and "| dpsh_authors | " in table and "`--dpsh_gradient_factors 1` (dpsh.yaml)" in table
