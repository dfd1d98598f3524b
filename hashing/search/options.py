"""The search methods HammingIndex offers and the bounds of their options, checked before anything is built (an
index file is data, so the options it names are checked too)."""
import math

import numpy as np

from utils.errors import UserError

from hashing.search.backend import backend_class
from hashing.search.mih import MAX_SUBSTRING_BITS

MAX_HASH_BIT = 1 << 16
# Exactness of each method HammingIndex offers (its backend: hashing/search/backend.py BUILTIN_MODULES).
METHODS = {"auto": True, "flat": True, "mih": True, "ivf": False, "hnsw": False}
DEFAULT_METHOD = "auto"
# Inclusive bounds of the integer options ("neighbors": 10**6 took 15 GB, nlist 10**9 a MemoryError, ef_search -1
# returned ids of -1); substrings: from the code length (option_problem).
OPTION_BOUNDS = {"nlist": (1, 1 << 16), "nprobe": (1, 1 << 16), "seed": (0, 2 ** 31 - 1), "neighbors": (2, 256),
                 "ef_construction": (1, 1 << 12), "ef_search": (1, 1 << 16)}


class OptionError(UserError, ValueError):
    """A search option out of its bounds: a UserError (one line for the user) and a ValueError (for code)."""


def method_options(method):
    """The options `method` takes, with their defaults (None = chosen from the data)."""
    return backend_class(method).OPTIONS


def option_problem(method, options, hash_bit):
    """What is wrong with a method's `options` for `hash_bit`-bit codes ("option NAME ..."), else None."""
    known = method_options(method)
    unknown = set(options) - set(known)
    if unknown:
        return (f"method {method!r} takes no option {', '.join(sorted(map(str, unknown)))}; its options: "
                f"{', '.join(known) or 'none'}")
    bounds = {**OPTION_BOUNDS, "substrings": (math.ceil(hash_bit / MAX_SUBSTRING_BITS), hash_bit)}
    for name, value in options.items():
        if name == "use_faiss":
            if value is not None and not isinstance(value, bool):
                return f"option use_faiss must be true, false or null, got {value!r}"
            continue
        low, high = bounds[name]
        if value is None and name in ("nlist", "substrings"):  # chosen from the data
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            extra = f" (substrings of at most {MAX_SUBSTRING_BITS} bits)" if name == "substrings" else ""
            return f"option {name} must be an integer from {low} to {high}{extra}, got {value!r}"
    return None


def is_exact(method):
    """Whether a method's results are exactly the flat scan's (METHODS)."""
    return METHODS[method]
