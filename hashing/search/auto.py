"""Method "auto" (exact, the default): each search uses the flat scan or multi-index hashing, whichever a cost
model predicts to be faster for the codes held, the code length, the substring count and k (or the radius).

The model (docs/SEARCH.md, "Where each method wins") prices one query in seconds:

    flat = flat_fixed + flat_per_word * N * W                      W = 64-bit words a code
    mih  = mih_fixed + mih_per_bucket * B + mih_per_candidate * C * W

B and C are the buckets multi-index hashing probes and the codes it meets on uniformly random codes, the case
that is hardest for it (queries unlike the database behave like it): to be sure of the k nearest it must
reach the distance r within which N codes hold k on average (for a radius search, r itself), and to reach r
substring j is probed up to radius floor((r - j) / m) (hashing/search/mih.py), each bucket holding N / 2^w
codes. On codes like a trained network's (clustered, queries near the database) multi-index hashing meets
far fewer codes, so the model chooses it only where it wins even on uniform codes: never much slower than
the flat scan, at the price of some lost speed-ups on clustered codes of 100,000 to 1,000,000.

The coefficients are fitted by benchmarks/fit_search_cost.py on uniform codes and stored in search_cost.json
next to this module with the command and machine that produced them; DEFAULT_COEFFICIENTS serve when the
file is absent. The multi-index tables are built the first time the model picks them, then kept up to date.
"""
import functools
import math
from pathlib import Path

from utils.documents import read_json_file
from utils.errors import UserError

from hashing.search.backend import numba_available, register_backend
from hashing.search.flat import FlatBackend
from hashing.search.mih import MultiIndexBackend, default_substrings, substring_bounds

COST_FILE = Path(__file__).with_name("search_cost.json")
# Seconds; rough figures of a 2-core machine, replaced by the fitted ones of COST_FILE.
DEFAULT_COEFFICIENTS = {"flat_fixed": 2e-5, "flat_per_word": 1e-9, "mih_fixed": 3e-5, "mih_per_bucket": 2e-8,
                        "mih_per_candidate": 6e-9}
# The k the model assumes when it must decide without a search (nbytes, or whether to build the tables now).
TYPICAL_K = 100


@functools.cache
def coefficients():
    """The fitted coefficients of COST_FILE, else DEFAULT_COEFFICIENTS."""
    if not COST_FILE.is_file():
        return dict(DEFAULT_COEFFICIENTS)
    fix = "run benchmarks/fit_search_cost.py again"
    stored = read_json_file(COST_FILE, "search cost file", 1 << 16, fix=fix)
    fitted = stored.get("coefficients") if isinstance(stored, dict) else None
    if not isinstance(fitted, dict) or not all(isinstance(fitted.get(name), (int, float)) and fitted[name] >= 0
                                               for name in DEFAULT_COEFFICIENTS):
        raise UserError(f"search cost file {COST_FILE} lacks the coefficients {', '.join(DEFAULT_COEFFICIENTS)} "
                        f"(numbers >= 0); {fix}")
    return {name: float(fitted[name]) for name in DEFAULT_COEFFICIENTS}


def knn_radius(num_codes, hash_bit, k):
    """The smallest r within which N uniformly random codes hold k codes of a query on average."""
    wanted, held = min(k, num_codes) / num_codes, 0.0
    for radius in range(hash_bit + 1):
        held += math.comb(hash_bit, radius) / 2 ** hash_bit  # exact integers, one rounding
        if held >= wanted:
            return radius
    return hash_bit


def mih_work(num_codes, hash_bit, substrings, radius):
    """(buckets probed, codes met) for multi-index hashing to cover `radius` on uniformly random codes."""
    buckets = codes = 0.0
    for j, (start, end) in enumerate(substring_bounds(hash_bit, substrings)):
        width = end - start
        reach = max((radius - j) // substrings, 0 if j == 0 else -1)
        probed = sum(math.comb(width, i) for i in range(min(reach, width) + 1))
        buckets += probed
        codes += probed * num_codes / 2 ** width
    return buckets, codes


def predicted_seconds(num_codes, hash_bit, substrings, k=None, radius=None, fitted=None):
    """{"flat": s, "mih": s}: the model's time of one query (k nearest, or within `radius`)."""
    fitted = fitted or coefficients()
    words = -(-hash_bit // 64)
    reach = radius if radius is not None else knn_radius(num_codes, hash_bit, k)
    buckets, met = mih_work(num_codes, hash_bit, substrings, min(reach, hash_bit))
    return {"flat": fitted["flat_fixed"] + fitted["flat_per_word"] * num_codes * words,
            "mih": fitted["mih_fixed"] + fitted["mih_per_bucket"] * buckets + fitted["mih_per_candidate"] * met * words}


@functools.lru_cache(maxsize=4096)  # searches of one index repeat the same question
def choose(num_codes, hash_bit, substrings=None, k=None, radius=None):
    """"mih" or "flat": the faster by the model (flat without numba, or for an empty index)."""
    if not num_codes or not numba_available():
        return "flat"
    substrings = substrings or default_substrings(hash_bit, num_codes)
    k = TYPICAL_K if k is None and radius is None else k
    times = predicted_seconds(num_codes, hash_bit, substrings, k=k, radius=radius)
    return "mih" if times["mih"] < times["flat"] else "flat"


@register_backend
class AutoBackend(MultiIndexBackend, FlatBackend):
    """The flat scan (FlatBackend: the codes, FAISS's copy) and multi-index tables over the same codes
    (MultiIndexBackend: built once the model first prefers them, then changed with the codes); each search
    runs the one of the two the model picks."""

    name = "auto"
    OPTIONS = {}

    @property
    def nbytes(self):
        return FlatBackend.nbytes.fget(self) + (self.tables.nbytes if self.tables is not None else 0)

    def arrays(self):
        return self.tables.arrays() if self.tables is not None else {}

    def method_for(self, k=None, radius=None):
        """The method a search of k nearest (or within radius) uses now."""
        substrings = self.tables.substrings if self.tables is not None else None
        return choose(len(self), self.hash_bit, substrings, k=k, radius=radius)

    def prepare(self):
        if self.method_for() == "mih":
            self.built()

    def search(self, queries, k):
        method = FlatBackend if self.method_for(k=min(int(k), len(self))) == "flat" else MultiIndexBackend
        return method.search(self, queries, k)

    def search_radius(self, queries, radius):
        method = FlatBackend if self.method_for(radius=min(int(radius), self.hash_bit)) == "flat" else MultiIndexBackend
        return method.search_radius(self, queries, radius)
