"""The classic shallow hashers, reference points for the deep losses (docs/METHOD.md §12): LSH, PCAH, ITQ, SH and
PCA + a random orthogonal rotation. Each fits on the training split's features only (fit() is given nothing else),
is seeded, and saves/loads its fitted state like a checkpoint.

All fitting is in float64 NumPy. A hasher's outputs are real values whose signs are the codes (+1 for >= 0, the
convention of hashing/codes.py), so they go through the same packing and evaluation as a network's outputs.
"""
import math

import numpy as np
import torch

from utils.checkpoint import SHALLOW_FORMAT, content_digest, read_saved, require_finite, save
from utils.errors import UserError

ITQ_ITERATIONS = 50  # Gong & Lazebnik's default (ITQ.m is called with n_iter = 50)
ROWS_AT_ONCE = 4096


def as_float64(features, what="features"):
    """A (N, D) float64 array of finite values, or a UserError naming `what`."""
    if hasattr(features, "detach"):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] == 0:
        raise UserError(f"{what} must be a 2-D (items, dimensions) array, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise UserError(f"{what} hold NaN or infinite values: the trunk that computed them diverged or is damaged")
    return features


def principal_directions(centred, count):
    """The `count` leading eigenvectors (D, count) of the covariance of `centred` (N, D), by decreasing eigenvalue;
    each signed so that its largest-magnitude entry is positive (an eigenvector's sign is arbitrary, this makes
    the codes a function of the data alone)."""
    covariance = centred.T @ centred / max(len(centred) - 1, 1)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(-values, kind="stable")[:count]
    directions = vectors[:, order]
    largest = np.abs(directions).argmax(axis=0)
    return directions * np.sign(directions[largest, np.arange(count)])


def random_rotation(size, rng):
    """A uniformly random (size, size) orthogonal matrix: the Q of a Gaussian matrix's QR decomposition, with
    the signs that make R's diagonal positive (Mezzadri 2007), i.e. Gram-Schmidt on the Gaussian columns."""
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


class ShallowHasher:
    """Fit on training features (fit), then real-valued outputs whose signs are the codes (outputs/encode).
    Subclasses set `name`, `needs_pca_bits` and implement _fit(centred, rng) -> state dict of arrays and
    _outputs(centred)."""
    name = None
    needs_pca_bits = True  # hash_bit PCA directions: hash_bit <= feature dimension
    defaults = {}

    def __init__(self, hash_bit, **settings):
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise UserError(f"shallow hasher {self.name} has no setting {unknown[0]} (it has: "
                            f"{', '.join(self.defaults) or 'none'})")
        self.hash_bit = hash_bit
        self.settings = {**self.defaults, **settings}
        self.state = None
        self.record = None  # what a saved hasher was fitted on (save_shallow_hasher's record)

    def fit(self, train_features, seed):
        """Fit on the training split's (N, D) features with `seed`; returns self."""
        features = as_float64(train_features, "the training features")
        if len(features) < 2:
            raise UserError(f"shallow hasher {self.name} needs at least 2 training items, got {len(features)}")
        if self.needs_pca_bits and self.hash_bit > features.shape[1]:
            raise UserError(f"shallow hasher {self.name} takes {self.hash_bit} PCA directions of "
                            f"{features.shape[1]}-dimensional features: pass --hash_bit {features.shape[1]} or "
                            "fewer, or use --hasher lsh or sh")
        mean = features.mean(axis=0)
        self.state = {"mean": mean, **self._fit(features - mean, np.random.default_rng(seed))}
        return self

    def outputs(self, features):
        """(N, hash_bit) real values whose signs are the codes; computed ROWS_AT_ONCE rows at a time, so that a
        large (memory-mapped) database is never held in float64 whole."""
        if self.state is None:
            raise RuntimeError(f"shallow hasher {self.name} is used before fit() or load_state_dict()")
        if features.ndim != 2 or features.shape[1] != len(self.state["mean"]):
            raise UserError(f"shallow hasher {self.name} was fitted on {len(self.state['mean'])}-dimensional "
                            f"features, these have shape {tuple(features.shape)}: use the trunk it was fitted with")
        return np.concatenate([self._outputs(as_float64(features[start:start + ROWS_AT_ONCE]) - self.state["mean"])
                               for start in range(0, len(features), ROWS_AT_ONCE)] or
                              [np.empty((0, self.hash_bit))])

    def encode(self, features):
        """(N, hash_bit) codes in {-1, +1} (float32), +1 for an output >= 0."""
        return torch.from_numpy(np.where(self.outputs(features) >= 0, 1.0, -1.0).astype(np.float32))

    def describe(self):
        """The hasher's record for the run log."""
        return {"hasher": self.name, "hash_bit": self.hash_bit, **self.settings}

    def state_dict(self):
        return {"format": SHALLOW_FORMAT, "name": self.name, "hash_bit": self.hash_bit,
                "settings": dict(self.settings),
                "state": {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in self.state.items()}}

    def load_state_dict(self, state):
        self.state = {key: tensor.numpy().astype(np.float64) for key, tensor in state["state"].items()}
        return self


class LinearHasher(ShallowHasher):
    """Outputs (x - mean) W for one fitted projection W (D, hash_bit)."""

    def _outputs(self, centred):
        return centred @ self.state["projection"]


class LSH(LinearHasher):
    """Random hyperplanes (Charikar 2002): W with i.i.d. N(0, 1) entries, on centred features."""
    name = "lsh"
    needs_pca_bits = False

    def _fit(self, centred, rng):
        return {"projection": rng.standard_normal((centred.shape[1], self.hash_bit))}


class PCAH(LinearHasher):
    """The hash_bit leading principal directions, then the sign."""
    name = "pcah"

    def _fit(self, centred, rng):
        return {"projection": principal_directions(centred, self.hash_bit)}


class PCARotation(LinearHasher):
    """The principal directions turned by a seeded random orthogonal rotation: ITQ's start, without its learning."""
    name = "pca_rotation"

    def _fit(self, centred, rng):
        return {"projection": principal_directions(centred, self.hash_bit) @ random_rotation(self.hash_bit, rng)}


class ITQ(LinearHasher):
    """Iterative quantisation (Gong & Lazebnik, TPAMI 2013): V = the PCA-projected features, R a random orthogonal
    start; each iteration B = sign(V R), then R solves the orthogonal Procrustes problem min ||B - V R||_F:
    with Bᵀ V = S Ω Ŝᵀ, R = Ŝ Sᵀ."""
    name = "itq"
    defaults = {"iterations": ITQ_ITERATIONS}

    def _fit(self, centred, rng):
        directions = principal_directions(centred, self.hash_bit)
        projected = centred @ directions
        rotation = random_rotation(self.hash_bit, rng)
        for _ in range(self.settings["iterations"]):
            codes = np.where(projected @ rotation >= 0, 1.0, -1.0)
            left, _, right_t = np.linalg.svd(codes.T @ projected)
            rotation = right_t.T @ left.T
        return {"projection": directions @ rotation}


class SpectralHashing(ShallowHasher):
    """Spectral hashing (Weiss, Torralba & Fergus, NIPS 2008; the authors' trainSH.m/compressSH.m): PCA to
    min(hash_bit, D) directions, a uniform distribution on each direction's range [mn, mx] of the training data,
    and the hash_bit analytical eigenfunctions of smallest eigenvalue other than the constant one: along direction
    j with mode k, sin(π/2 + k π (y_j - mn_j) / (mx_j - mn_j)), eigenvalue growing with (k / (mx_j - mn_j))²."""
    name = "sh"
    needs_pca_bits = False

    def _fit(self, centred, rng):
        directions = principal_directions(centred, min(self.hash_bit, centred.shape[1]))
        projected = centred @ directions
        low, high = projected.min(axis=0) - np.finfo(float).eps, projected.max(axis=0) + np.finfo(float).eps
        return {"pc": directions, "mn": low, "mx": high, "modes": self.smallest_modes(high - low)}

    def smallest_modes(self, ranges):
        """(hash_bit, directions) mode numbers: the one-direction modes k = 1..K_j per direction, in increasing
        order of (k / range_j)² (ties keep the enumeration order, direction by direction), the constant mode
        dropped. K_j = ceil((hash_bit + 1) range_j / max range) enumerates enough of them."""
        most = [math.ceil((self.hash_bit + 1) * r / ranges.max()) for r in ranges]
        modes = [np.zeros(len(ranges))]
        for direction, count in enumerate(most):
            for k in range(1, count):
                mode = np.zeros(len(ranges))
                mode[direction] = k
                modes.append(mode)
        modes = np.array(modes)
        eigenvalues = ((modes * np.pi / ranges) ** 2).sum(axis=1)
        return modes[np.argsort(eigenvalues, kind="stable")[1:self.hash_bit + 1]]

    def _outputs(self, centred):
        shifted = centred @ self.state["pc"] - self.state["mn"]
        omegas = self.state["modes"] * np.pi / (self.state["mx"] - self.state["mn"])
        return np.stack([np.prod(np.sin(shifted * omega + np.pi / 2), axis=1) for omega in omegas], axis=1)


SHALLOW_HASHERS = {cls.name: cls for cls in (LSH, PCAH, ITQ, SpectralHashing, PCARotation)}


def build_shallow_hasher(name, hash_bit, **settings):
    if name not in SHALLOW_HASHERS:
        raise UserError(f"no shallow hasher {name!r}; choose one of {', '.join(SHALLOW_HASHERS)}")
    return SHALLOW_HASHERS[name](hash_bit, **settings)


def save_shallow_hasher(hasher, path, record=None):
    """The fitted hasher at `path` (written atomically), with `record` (a dict of plain values: what it was
    fitted on) and the digest of its content that loading checks."""
    state = {**hasher.state_dict(), "record": dict(record or {})}
    save({**state, "content_sha256": content_digest(state)}, path)


def _expected_shapes(name, hash_bit, dimension):
    if name == "sh":
        directions = min(hash_bit, dimension)
        return {"mean": (dimension,), "pc": (dimension, directions), "mn": (directions,), "mx": (directions,),
                "modes": (hash_bit, directions)}
    return {"mean": (dimension,), "projection": (dimension, hash_bit)}


def load_shallow_hasher(path, what="shallow hasher"):
    """The fitted hasher saved at `path`; UserError naming the file when it is missing, damaged or not one."""
    advice = "fit it again (the same command without --test) or point --checkpoint to a good copy"
    state = read_saved(path, what, advice, advice)
    if not isinstance(state, dict) or state.get("format") != SHALLOW_FORMAT:
        raise UserError(f"{path} is not a fitted shallow hasher of this tool (a network checkpoint? drop --hasher "
                        f"to use it); {advice}")
    recorded = state.pop("content_sha256", None)
    if recorded != content_digest(state):
        raise UserError(f"{path} is damaged: its content differs from the digest recorded when it was saved; {advice}")
    name, hash_bit, arrays, settings = (state.get(key) for key in ("name", "hash_bit", "state", "settings"))
    if name not in SHALLOW_HASHERS or not isinstance(hash_bit, int) or not isinstance(arrays, dict) \
            or not isinstance(settings, dict) or set(settings) != set(SHALLOW_HASHERS[name].defaults) \
            or not isinstance(arrays.get("mean"), torch.Tensor) or arrays["mean"].ndim != 1:
        raise UserError(f"{path} has a damaged shallow-hasher record; {advice}")
    expected = _expected_shapes(name, hash_bit, len(arrays["mean"]))
    found = {key: tuple(value.shape) for key, value in arrays.items() if isinstance(value, torch.Tensor)}
    if found != expected:
        raise UserError(f"{path}: the {name} state holds {found}, not the shapes {expected} it needs; {advice}")
    require_finite(arrays, path, f"it is damaged; {advice}")
    hasher = build_shallow_hasher(name, hash_bit, **settings).load_state_dict(state)
    hasher.record = state.get("record")
    return hasher
