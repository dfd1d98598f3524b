"""The one interface every search method implements (SearchBackend), the registry of methods and open_backend,
the factory that builds one by name (FAISS's index_factory is the model).

A backend holds packed binary codes (hashing.codes.pack_signs rows: uint8, ceil(hash_bit / 8) bytes a code)
under int64 ids >= 0, and answers k-nearest and radius searches by id:

    backend = open_backend("mih", 64, substrings=4)
    backend.add(codes, ids)                     # ids new to the backend, each once
    distances, ids = backend.search(queries, k)  # int32 and int64, shape (Q, min(k, len(backend)))
    backend.search_radius(queries, r)            # [(distances, ids)] per query, every code at distance <= r
    backend.remove(ids)                          # how many were held

An exact backend (`exact = True`) returns what a brute-force scan does, in the evaluator's order: ascending
distance, ties by id (docs/METHOD.md §3.2). An approximate one returns true distances in that order but may
miss neighbours: a query it finds fewer than k codes for is padded with id -1 at distance hash_bit + 1.

Differences from FAISS's binary indexes, kept on purpose (docs/SEARCH.md, "The backend interface"): k larger
than the number of codes gives min(k, N) columns, not k columns padded with -1; a radius search includes
distance r (FAISS's range_search keeps d < r) and returns one (distances, ids) pair per query, not FAISS's
(lims, D, I); ties come out by id.

Backends take validated input: hashing.search.index.HammingIndex, the public entry, checks codes, ids, k and
the radius, and keeps the file format. A backend that keeps its codes has a `store` (SortedCodes): the codes
in id order, which HammingIndex reads and saves. A backend whose search structure is worth saving with an
index file (multi-index hashing's tables) returns it from arrays() and takes it back in restore().

Registering: a module defines a SearchBackend subclass with a `name` and decorates it with
@register_backend; open_backend imports the modules of BUILTIN_MODULES on first use, so a backend written
elsewhere (hashing/search/milvus.py) registers itself by being listed there or imported.
"""
import abc
import importlib
import importlib.util

import numpy as np

from utils.errors import UserError

BACKENDS = {}
# The module each method's backend lives in (imported when the method is first asked for).
BUILTIN_MODULES = {"flat": "hashing.search.flat", "mih": "hashing.search.mih", "auto": "hashing.search.auto",
                   "ivf": "hashing.search.faiss_backend", "hnsw": "hashing.search.faiss_backend",
                   "milvus": "hashing.search.milvus"}


def faiss_available():
    return importlib.util.find_spec("faiss") is not None


def numba_available():
    return importlib.util.find_spec("numba") is not None


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("this needs FAISS: pip install faiss-cpu (see requirements.txt)") from None
    return faiss


def empty_result(num_queries, k=0):
    """(distances, ids) of shape (num_queries, k), int32 and int64 zeros: a search that has nothing to do."""
    return np.zeros((num_queries, k), dtype=np.int32), np.zeros((num_queries, k), dtype=np.int64)


def no_matches(num_queries):
    """A radius search's answer of an empty backend: an empty (distances, ids) pair per query."""
    return [(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)) for _ in range(num_queries)]


def order_by_distance_then_id(distances, ids):
    """Each result row re-sorted by (distance, id)."""
    order = np.lexsort((ids, distances), axis=-1)
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(ids, order, axis=1)


class SortedCodes:
    """Packed codes with int64 ids, row i holding the i-th smallest id: the one place rows are inserted and
    removed. Callers pass ids that are new and distinct (HammingIndex checks)."""

    def __init__(self, code_bytes, codes=None, ids=None):
        self.codes = np.zeros((0, code_bytes), dtype=np.uint8) if codes is None else codes
        self.ids = np.zeros(0, dtype=np.int64) if ids is None else ids

    def __len__(self):
        return len(self.ids)

    @property
    def nbytes(self):
        return self.codes.nbytes + self.ids.nbytes

    def held(self, ids):
        """The ones of (sorted) `ids` already held."""
        if not len(self) or not len(ids):
            return ids[:0]
        places = np.minimum(np.searchsorted(self.ids, ids), len(self) - 1)
        return ids[self.ids[places] == ids]

    def insert(self, codes, ids):
        """Insert rows; returns whether they all went after the rows held (an append: rows kept their places)."""
        order = np.argsort(ids, kind="stable")
        ids, codes = np.asarray(ids, dtype=np.int64)[order], codes[order]
        appended = not len(self) or not len(ids) or ids[0] > self.ids[-1]
        if appended:
            self.ids = np.concatenate([self.ids, ids])
            self.codes = np.concatenate([self.codes, codes])
        else:
            places = np.searchsorted(self.ids, ids)
            self.ids = np.insert(self.ids, places, ids)
            self.codes = np.insert(self.codes, places, codes, axis=0)
        return appended

    def delete(self, ids):
        """Remove the rows of `ids` (ids not held are ignored); returns the boolean mask of the rows kept."""
        keep = ~np.isin(self.ids, np.asarray(ids, dtype=np.int64).ravel())
        if not keep.all():
            self.ids, self.codes = self.ids[keep], self.codes[keep]
        return keep


class SearchBackend(abc.ABC):
    """One search method over packed codes with int64 ids (this module's docstring has the contract).

    Class attributes: name (the method's name in open_backend and in index files), exact, and OPTIONS, the
    options the method takes with their defaults (None = chosen from the data)."""

    name = None
    exact = True
    OPTIONS = {}

    def __init__(self, hash_bit, **options):
        self.hash_bit = int(hash_bit)
        self.options = {**self.OPTIONS, **options}

    @property
    def code_bytes(self):
        return -(-self.hash_bit // 8)

    @abc.abstractmethod
    def add(self, codes, ids):
        """Add packed codes (uint8 (N, code_bytes)) under new, distinct int64 ids."""

    @abc.abstractmethod
    def remove(self, ids):
        """Remove the codes of `ids`; ids not held are ignored. Returns how many were removed."""

    @abc.abstractmethod
    def search(self, queries, k):
        """(distances int32, ids int64) of shape (Q, min(k, len(self))): each query's k nearest codes."""

    @abc.abstractmethod
    def search_radius(self, queries, radius):
        """[(distances int32, ids int64)] per query: every code within Hamming distance `radius` (<=)."""

    @abc.abstractmethod
    def __len__(self):
        """The number of codes held."""

    def prepare(self):
        """Build the search structure now rather than at the first search (HammingIndex.build calls it)."""

    @property
    def store(self):
        """The codes in id order (SortedCodes), for a backend that keeps them; else None."""
        return None

    @property
    def nbytes(self):
        """Bytes the backend holds (codes, ids, search structure), or None when not known (a remote server)."""
        return None

    def arrays(self):
        """The search structure as named arrays, saved with an index file ({} = rebuilt on load)."""
        return {}

    def restore(self, codes, ids, arrays):
        """Take back the codes, ids and arrays() saved in an index file; returns False when `arrays` do not fit
        (another method's, another version's), and then nothing is changed (the caller adds the codes)."""
        return False

    def save(self, path):
        raise NotImplementedError(f"search method {self.name!r} saves through hashing.search.index.HammingIndex.save")

    def __repr__(self):
        return f"{type(self).__name__}({len(self):,} codes of {self.hash_bit} bits)"


class StoredBackend(SearchBackend):
    """A backend that keeps its codes in id order (SortedCodes) next to its search structure."""

    def __init__(self, hash_bit, **options):
        super().__init__(hash_bit, **options)
        self._store = SortedCodes(self.code_bytes)

    @property
    def store(self):
        return self._store

    def __len__(self):
        return len(self._store)

    def add(self, codes, ids):
        """Insert the codes into the store; returns whether they went after the rows held (SortedCodes.insert)."""
        return self._store.insert(codes, ids)

    def remove(self, ids):
        keep = self._store.delete(ids)
        return int(len(keep) - keep.sum())

    def restore(self, codes, ids, arrays):
        """Take the codes and ids; saved `arrays` do not fit a backend that saves none."""
        if arrays:
            return False
        self._store = SortedCodes(self.code_bytes, codes, ids)
        return True


def register_backend(cls):
    """Class decorator: make `cls` (a SearchBackend with a name) available to open_backend under cls.name."""
    if not (isinstance(cls, type) and issubclass(cls, SearchBackend) and cls.name):
        raise TypeError(f"{cls!r} is not a SearchBackend subclass with a name")
    BACKENDS[cls.name] = cls
    return cls


def backend_class(name):
    """The registered backend class of method `name`, importing its module when needed; ValueError if unknown."""
    if name not in BACKENDS and name in BUILTIN_MODULES:
        try:
            importlib.import_module(BUILTIN_MODULES[name])
        except ModuleNotFoundError as error:
            if error.name != BUILTIN_MODULES[name]:
                raise
    if name not in BACKENDS:
        known = sorted(set(BACKENDS) | {m for m in BUILTIN_MODULES if m != "milvus"})
        raise ValueError(f"unknown search method {name!r}; choose one of {', '.join(known)}")
    return BACKENDS[name]


def open_backend(spec, hash_bit, **options):
    """An empty backend of method `spec` ("flat", "mih", "auto", "ivf", "hnsw", or a registered one such as
    "milvus") for `hash_bit`-bit codes, with `options` (the class's OPTIONS; the caller checks their bounds)."""
    return backend_class(spec)(hash_bit, **options)
