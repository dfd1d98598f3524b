"""The shallow hashers (hashing/shallow.py, docs/METHOD.md §12) against slow reference loops written from the papers'
formulas: PCA by power iteration with deflation, the random rotation by Gram-Schmidt, ITQ's Procrustes step by
Newton's polar iteration (no SVD), spectral hashing's modes by enumeration and sorting."""
import math

import numpy as np
import pytest
import torch

from hashing.shallow import (ITQ_ITERATIONS, SHALLOW_HASHERS, SpectralHashing, build_shallow_hasher,
                             load_shallow_hasher, save_shallow_hasher)
from utils.checkpoint import save
from utils.errors import UserError

BITS = 6


def toy_features(seed=0, items=120, dimension=10):
    """Gaussian features with well-separated variances per axis, turned by a fixed rotation and shifted, so PCA's
    directions are unique and power iteration converges."""
    rng = np.random.default_rng(seed)
    scales = np.array([6.0, 5.0, 4.0, 3.2, 2.5, 2.0, 1.5, 1.0, 0.6, 0.3])[:dimension]
    turn, _ = np.linalg.qr(np.random.default_rng(99).standard_normal((dimension, dimension)))
    return rng.standard_normal((items, dimension)) * scales @ turn + 3.0


# ---------- reference loops ----------

def reference_mean(features):
    return [sum(row[j] for row in features) / len(features) for j in range(len(features[0]))]


def reference_pca(features, count, steps=3000):
    """Leading eigenvectors of the covariance by power iteration with deflation, each signed so that its
    largest-magnitude entry is positive; returns (mean, directions as a list of vectors)."""
    mean = reference_mean(features)
    centred = [[value - m for value, m in zip(row, mean)] for row in features]
    d = len(mean)
    cov = [[sum(row[i] * row[j] for row in centred) / (len(centred) - 1) for j in range(d)] for i in range(d)]
    directions = []
    for _ in range(count):
        vector = [1.0 / math.sqrt(d)] * d
        for _ in range(steps):
            product = [sum(cov[i][j] * vector[j] for j in range(d)) for i in range(d)]
            norm = math.sqrt(sum(v * v for v in product))
            vector = [v / norm for v in product]
        value = sum(vector[i] * sum(cov[i][j] * vector[j] for j in range(d)) for i in range(d))
        cov = [[cov[i][j] - value * vector[i] * vector[j] for j in range(d)] for i in range(d)]
        largest = max(range(d), key=lambda i: abs(vector[i]))
        directions.append([v if vector[largest] > 0 else -v for v in vector])
    return mean, directions


def reference_project(features, mean, directions):
    return [[sum((x - m) * w for x, m, w in zip(row, mean, direction)) for direction in directions]
            for row in features]


def gram_schmidt(columns):
    """Orthonormalise the columns (a list of vectors) in order."""
    basis = []
    for column in columns:
        v = list(column)
        for b in basis:
            dot = sum(x * y for x, y in zip(column, b))
            v = [x - dot * y for x, y in zip(v, b)]
        norm = math.sqrt(sum(x * x for x in v))
        basis.append([x / norm for x in v])
    return basis


def reference_rotation(size, seed):
    """The rotation the hasher draws with `seed`: the same Gaussian matrix, orthonormalised column by column."""
    gaussian = np.random.default_rng(seed).standard_normal((size, size))
    return np.array(gram_schmidt([list(gaussian[:, j]) for j in range(size)])).T


def polar_factor(matrix, steps=100):
    """The orthogonal factor of matrix = Q H by Newton's iteration X <- (X + X^-T) / 2 (Higham 1986), which solves
    the orthogonal Procrustes problem max tr(Rᵀ matrix) without an SVD."""
    x = np.array(matrix, dtype=float)
    for _ in range(steps):
        x = (x + np.linalg.inv(x).T) / 2
    return x


def signs(values):
    return np.where(np.asarray(values) >= 0, 1.0, -1.0)


# ---------- each hasher against its reference ----------

def test_pcah_is_the_sign_of_the_leading_principal_directions():
    features = toy_features()
    mean, directions = reference_pca(features.tolist(), BITS)
    expected = reference_project(features.tolist(), mean, directions)
    hasher = build_shallow_hasher("pcah", BITS).fit(features, seed=0)
    np.testing.assert_allclose(hasher.outputs(features), expected, atol=1e-6)
    assert torch.equal(hasher.encode(features), torch.tensor(signs(expected), dtype=torch.float32))


def test_lsh_is_the_sign_of_gaussian_hyperplanes_on_centred_features():
    features = toy_features(dimension=5)
    hyperplanes = np.random.default_rng(7).standard_normal((5, 12))
    mean = reference_mean(features.tolist())
    expected = [[sum((x - m) * hyperplanes[j, b] for j, (x, m) in enumerate(zip(row, mean))) for b in range(12)]
                for row in features.tolist()]
    hasher = build_shallow_hasher("lsh", 12).fit(features, seed=7)  # more bits than dimensions is fine for LSH
    np.testing.assert_allclose(hasher.outputs(features), expected, atol=1e-9)
    assert torch.equal(hasher.encode(features), torch.tensor(signs(expected), dtype=torch.float32))


def test_pca_rotation_turns_the_principal_directions_by_a_random_orthogonal_matrix():
    features = toy_features()
    mean, directions = reference_pca(features.tolist(), BITS)
    projected = np.array(reference_project(features.tolist(), mean, directions))
    expected = projected @ reference_rotation(BITS, seed=3)
    hasher = build_shallow_hasher("pca_rotation", BITS).fit(features, seed=3)
    np.testing.assert_allclose(hasher.outputs(features), expected, atol=1e-6)
    assert torch.equal(hasher.encode(features), torch.tensor(signs(expected), dtype=torch.float32))


def reference_itq(features, bits, seed, iterations):
    """Gong & Lazebnik's loop: V = PCA-projected data, R a random rotation; B = sgn(V R), then R the orthogonal
    Procrustes solution of min ||B - V R||_F (the polar factor of Vᵀ B). The quantisation loss never grows."""
    mean, directions = reference_pca(features.tolist(), bits)
    projected = np.array(reference_project(features.tolist(), mean, directions))
    rotation = reference_rotation(bits, seed)
    losses = []
    for _ in range(iterations):
        codes = signs(projected @ rotation)
        losses.append(((codes - projected @ rotation) ** 2).sum())
        rotation = polar_factor(projected.T @ codes)
        losses.append(((codes - projected @ rotation) ** 2).sum())
    assert all(later <= earlier + 1e-6 for earlier, later in zip(losses, losses[1:]))
    return projected @ rotation


@pytest.mark.parametrize("iterations", [ITQ_ITERATIONS, 3])
def test_itq_matches_the_papers_alternating_loop(iterations):
    features = toy_features(seed=1)
    expected = reference_itq(features, BITS, seed=5, iterations=iterations)
    hasher = build_shallow_hasher("itq", BITS, iterations=iterations).fit(features, seed=5)
    np.testing.assert_allclose(hasher.outputs(features), expected, atol=1e-5)
    assert torch.equal(hasher.encode(features), torch.tensor(signs(expected), dtype=torch.float32))


def test_itq_without_iterations_is_pca_rotation_and_its_iterations_lower_the_quantisation_loss():
    features = toy_features(seed=2)
    start = build_shallow_hasher("itq", BITS, iterations=0).fit(features, seed=4)
    rotation = build_shallow_hasher("pca_rotation", BITS).fit(features, seed=4)
    np.testing.assert_allclose(start.outputs(features), rotation.outputs(features), atol=1e-12)
    learnt = build_shallow_hasher("itq", BITS).fit(features, seed=4)

    def loss(values):
        return ((signs(values) - values) ** 2).sum()
    assert loss(learnt.outputs(features)) < loss(start.outputs(features))


def reference_sh(features, bits, queries):
    """Weiss et al.'s spectral hashing as the authors' trainSH/compressSH compute it: PCA to min(bits, D)
    directions, the range [min - eps, max + eps] of each, the one-direction modes (j, k) sorted by the eigenvalue
    (k π / range_j)² (ties in enumeration order), the constant mode dropped; bit = sin(π/2 + k π (y_j - mn_j) /
    range_j) >= 0 (it is a product over directions where every other direction's mode is 0, sin(π/2) = 1)."""
    count = min(bits, features.shape[1])
    mean, directions = reference_pca(features.tolist(), count)
    projected = reference_project(features.tolist(), mean, directions)
    eps = np.finfo(float).eps
    low = [min(row[j] for row in projected) - eps for j in range(count)]
    high = [max(row[j] for row in projected) + eps for j in range(count)]
    ranges = [h - lo for h, lo in zip(high, low)]
    candidates = [(0.0, None, 0)]
    for j, r in enumerate(ranges):
        for k in range(1, math.ceil((bits + 1) * r / max(ranges))):
            candidates.append(((k * math.pi / r) ** 2, j, k))
    chosen = sorted(candidates, key=lambda c: c[0])[1:bits + 1]
    rows = reference_project(queries.tolist(), mean, directions)
    return [[math.sin(math.pi / 2 + k * math.pi * (row[j] - low[j]) / ranges[j]) for _, j, k in chosen]
            for row in rows]


@pytest.mark.parametrize("bits", [4, 16])  # 16 bits > 10 dimensions: several modes along one direction
def test_spectral_hashing_matches_the_authors_computation(bits):
    features, queries = toy_features(seed=3), toy_features(seed=4, items=30)
    expected = reference_sh(features, bits, queries)
    hasher = build_shallow_hasher("sh", bits).fit(features, seed=0)
    np.testing.assert_allclose(hasher.outputs(queries), expected, atol=1e-6)
    assert torch.equal(hasher.encode(queries), torch.tensor(signs(expected), dtype=torch.float32))


def test_spectral_hashing_picks_the_modes_of_smallest_eigenvalue_by_hand():
    """Ranges 2 and 1.5, 3 bits: (π/2)² = 2.47 (direction 0, k = 1), (π/1.5)² = 4.39 (direction 1, k = 1),
    (2π/2)² = 9.87 (direction 0, k = 2); the next, (2π/1.5)² = 17.5, is left out."""
    modes = SpectralHashing(3).smallest_modes(np.array([2.0, 1.5]))
    np.testing.assert_array_equal(modes, [[1, 0], [0, 1], [2, 0]])


# ---------- fitting, seeds, files ----------

@pytest.mark.parametrize("name", list(SHALLOW_HASHERS))
def test_fitting_reads_the_training_features_only_and_encoding_changes_nothing(name):
    """By construction: the query features do not exist while fit() runs (they are made after it returns), and
    encoding them leaves the fitted state as it was: codes of the training items are the same before and after."""
    train = toy_features(seed=5)
    hasher = build_shallow_hasher(name, BITS).fit(train, seed=1)
    fitted = {key: value.copy() for key, value in hasher.state.items()}
    train_codes = hasher.encode(train)
    hasher.encode(toy_features(seed=6, items=40) * 5 - 7)
    for key, value in fitted.items():
        np.testing.assert_array_equal(hasher.state[key], value)
    assert torch.equal(hasher.encode(train), train_codes)


@pytest.mark.parametrize("name", list(SHALLOW_HASHERS))
def test_same_seed_same_codes(name):
    features = toy_features(seed=7)
    first = build_shallow_hasher(name, BITS).fit(features, seed=11).encode(features)
    again = build_shallow_hasher(name, BITS).fit(features, seed=11).encode(features)
    other = build_shallow_hasher(name, BITS).fit(features, seed=12).encode(features)
    assert torch.equal(first, again)
    assert set(first.unique().tolist()) <= {-1.0, 1.0}
    if name in ("lsh", "itq", "pca_rotation"):
        assert not torch.equal(first, other)
    else:  # PCAH and SH draw nothing at random
        assert torch.equal(first, other)


@pytest.mark.parametrize("name", list(SHALLOW_HASHERS))
def test_save_and_load_give_the_same_codes(tmp_path, name):
    features, queries = toy_features(seed=8), toy_features(seed=9, items=25)
    hasher = build_shallow_hasher(name, BITS, **({"iterations": 7} if name == "itq" else {})).fit(features, seed=2)
    save_shallow_hasher(hasher, tmp_path / "h.ckpt")
    loaded = load_shallow_hasher(tmp_path / "h.ckpt")
    assert type(loaded) is type(hasher) and loaded.describe() == hasher.describe()
    assert torch.equal(loaded.encode(queries), hasher.encode(queries))


def test_a_damaged_or_foreign_file_is_refused_naming_it(tmp_path):
    hasher = build_shallow_hasher("itq", BITS).fit(toy_features(), seed=0)
    path = tmp_path / "h.ckpt"
    save_shallow_hasher(hasher, path)
    raw = bytearray(path.read_bytes())
    path.with_name("cut.ckpt").write_bytes(raw[:len(raw) // 2])
    state = hasher.state_dict()
    state["state"]["projection"][0, 0] += 1.0  # a changed value under the old digest
    save({**state, "content_sha256": "0" * 64}, tmp_path / "changed.ckpt")
    save({"weight": torch.zeros(2, 2)}, tmp_path / "network.ckpt")
    for name, words in [("cut.ckpt", "truncated"), ("changed.ckpt", "damaged"), ("network.ckpt", "not a fitted"),
                        ("missing.ckpt", "no shallow hasher")]:
        with pytest.raises(UserError, match=words) as caught:
            load_shallow_hasher(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value)


@pytest.mark.parametrize("name", ["pcah", "itq", "pca_rotation"])
def test_more_bits_than_feature_dimensions_is_refused_for_pca_hashers(name):
    with pytest.raises(UserError, match=r"--hash_bit 10 or fewer"):
        build_shallow_hasher(name, 11).fit(toy_features(), seed=0)


def test_unknown_hasher_or_setting_is_refused():
    with pytest.raises(UserError, match="choose one of"):
        build_shallow_hasher("kmeans", 8)
    with pytest.raises(UserError, match="no setting"):
        build_shallow_hasher("lsh", 8, iterations=3)


@pytest.mark.parametrize("name", list(SHALLOW_HASHERS))
def test_encoding_in_blocks_of_rows_gives_the_codes_of_one_block(monkeypatch, name):
    import hashing.shallow
    features, queries = toy_features(seed=10), toy_features(seed=11, items=50)
    hasher = build_shallow_hasher(name, BITS).fit(features, seed=0)
    whole = hasher.encode(queries)
    monkeypatch.setattr(hashing.shallow, "ROWS_AT_ONCE", 7)
    assert torch.equal(hasher.encode(queries), whole)
    assert hasher.encode(queries[:0]).shape == (0, BITS)
