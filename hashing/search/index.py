"""A Hamming index over packed binary codes with integer ids: build it, add and remove ids, save and load it,
and search it for the k nearest codes or for every code within a Hamming radius.

HammingIndex is the public entry over one search backend (hashing/search/backend.py, the interface every
method implements): it checks what it is given (codes, ids, k, radius, options) and keeps the file format;
the backend holds the codes and searches them.

Order. Results come in the evaluator's order (docs/METHOD.md §3.2): ascending Hamming distance, ties by id
ascending. With ids = database indices (the default) that is the ranking mAP scores and `--query` prints.

Methods (`method=`; docs/SEARCH.md has where each wins):

- "flat" (exact, hashing/search/flat.py): every code is compared, FAISS's IndexBinaryFlat when installed,
  else NumPy. hashing/search/exact.py's search() (used by --query) is this method: one ranking.
- "mih" (exact, hashing/search/mih.py): multi-index hashing, which visits only the codes that can be among the
  result; identical results to "flat" to the last tie.
- "auto" (exact, the default; hashing/search/auto.py): per search "flat" or "mih", whichever a cost model
  fitted by benchmarks/fit_search_cost.py predicts faster for N, the code length, the substring count and k
  (or the radius).
- "ivf", "hnsw" (approximate, hashing/search/faiss_backend.py): FAISS's IndexBinaryIVF and IndexBinaryHNSW.
  A query for which they found fewer than k codes gets id -1 at distance hash_bit + 1 in the missing places.

Changes. add() and remove() copy the arrays once (O(N)); multi-index tables are changed in place, FAISS's
approximate indexes rebuilt at the next search; so change an index in batches. Several threads may search an
index at once, but none may change it while another searches it.

File (format 2). save() writes atomically: MAGIC, a little-endian uint32 header length, a JSON header (format,
hash_bit, rows, method, options, structure: the name, dtype and shape of each array of the search structure)
padded to a multiple of 64 bytes, the codes (rows x ceil(hash_bit / 8) bytes), the ids (rows little-endian
int64), then each array of the structure from the next multiple of 64 bytes. load() refuses anything but a
regular file, checks the header against the file size before reading the arrays, checks that the ids
increase and the padding bits are 0, and gives the structure to the backend, which checks it (multi-index
tables: bucket offsets within the codes) and otherwise rebuilds it from the codes. Format 1 files (no
structure) still load. load(mmap=True) maps the arrays instead of reading them.
"""
import json
import math
import struct

import numpy as np

from utils.atomic import atomic_write
from utils.documents import parse_json
from utils.errors import UserError
from utils.paths import check_output_target, open_regular, require_regular_file

from hashing.search.backend import backend_class, faiss_available, import_faiss, numba_available, open_backend
from hashing.search.flat import faiss_flat_index
from hashing.search.mih import MAX_SUBSTRING_BITS

__all__ = ["HammingIndex", "METHODS", "faiss_available", "faiss_flat_index", "import_faiss", "is_index_file",
           "numba_available"]

MAGIC = b"hyp2-hamming-index\n"
FORMAT_VERSION = 2  # 2: the search structure (multi-index tables) follows the ids; 1: codes and ids only
READABLE_VERSIONS = (1, 2)
MAX_HEADER_BYTES = 1 << 16
MAX_HASH_BIT = 1 << 16
ALIGNMENT = 64
# Exactness of each method HammingIndex offers (its backend: hashing/search/backend.py BUILTIN_MODULES).
METHODS = {"auto": True, "flat": True, "mih": True, "ivf": False, "hnsw": False}
# Inclusive bounds of the integer options: an index file is data, so the options it names are checked before
# anything is built ("neighbors": 10**6 took 15 GB, nlist 10**9 a MemoryError, ef_search -1 returned ids of -1).
OPTION_BOUNDS = {"nlist": (1, 1 << 16), "nprobe": (1, 1 << 16), "seed": (0, 2 ** 31 - 1), "neighbors": (2, 256),
                 "ef_construction": (1, 1 << 12), "ef_search": (1, 1 << 16)}
DEFAULT_METHOD = "auto"
# The dtypes a saved search structure's arrays may have.
STRUCTURE_DTYPES = ("<i8", "<u8")


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


class HammingIndex:
    """Packed binary codes (hashing/codes.py: uint8 rows of ceil(hash_bit / 8) bytes) with int64 ids >= 0,
    searched by one backend (hashing/search/backend.py): the public entry, which checks what it is given,
    and keeps the file format.

    HammingIndex(hash_bit, method, **options) is an empty index; HammingIndex.build(codes, ids) fills one.
    Options per method: flat: use_faiss (None = when installed); mih: substrings (None = from the size);
    ivf: nlist (None = sqrt(N); at most N), nprobe, seed (of the training sample and k-means); hnsw:
    neighbors (FAISS's M), ef_construction, ef_search; auto: none. Integer options are bounded (OPTION_BOUNDS;
    substrings so that no substring is over MAX_SUBSTRING_BITS bits): ValueError here, and UserError for a
    file that names others.

    Where this differs from FAISS's binary indexes: search(q, k) with k > len(index) returns len(index) columns
    (FAISS: k, padded with id -1); search_radius(q, r) includes distance r (FAISS: d < r) and returns one
    (distances, ids) pair per query (FAISS: lims, D, I); ties come out by id.
    """

    def __init__(self, hash_bit, method=DEFAULT_METHOD, **options):
        if method not in METHODS:
            raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(hash_bit, bool) or not isinstance(hash_bit, (int, np.integer)) or \
                not 1 <= hash_bit <= MAX_HASH_BIT:
            raise ValueError(f"hash_bit must be an integer from 1 to {MAX_HASH_BIT}, got {hash_bit!r}")
        problem = option_problem(method, options, hash_bit)
        if problem:
            raise OptionError(problem)
        self.hash_bit = int(hash_bit)
        self.method = method
        self.backend = open_backend(method, self.hash_bit, **options)
        self.options = self.backend.options

    @classmethod
    def build(cls, codes, ids=None, hash_bit=None, method=DEFAULT_METHOD, **options):
        """An index of packed `codes` with `ids` (default 0..N-1); hash_bit defaults to 8 bits a byte. The
        search structure is built here, so that the first search does not pay for it."""
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"codes must be a 2-D array of packed rows, got shape {codes.shape}")
        index = cls(codes.shape[1] * 8 if hash_bit is None else hash_bit, method, **options)
        index.add(codes, ids)
        index.backend.prepare()
        return index

    @property
    def code_bytes(self):
        return -(-self.hash_bit // 8)

    @property
    def resolved_method(self):
        """The method a k-nearest search uses now: "auto" resolved by its cost model (hashing/search/auto.py)."""
        return self.backend.method_for() if self.method == "auto" else self.method

    @property
    def exact(self):
        return is_exact(self.method)

    @property
    def ids(self):
        """The ids, ascending (read-only)."""
        return self._read_only(self.backend.store.ids)

    @property
    def codes(self):
        """The codes, one row per id of `ids` (read-only)."""
        return self._read_only(self.backend.store.codes)

    @staticmethod
    def _read_only(array):
        view = array.view()
        view.flags.writeable = False
        return view

    @property
    def nbytes(self):
        """Bytes held: codes, ids and the search structure (built if needed)."""
        return self.backend.nbytes

    def __len__(self):
        return len(self.backend)

    def __repr__(self):
        return f"HammingIndex({len(self):,} codes of {self.hash_bit} bits, method={self.method!r})"

    # ---------- changes ----------

    def _packed(self, codes, what):
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.dtype != np.uint8:
            raise ValueError(f"{what} must be packed uint8 rows (hashing.codes.pack_signs of the network outputs), "
                             f"got {codes.dtype} of shape {codes.shape}")
        if codes.shape[1] != self.code_bytes:
            raise ValueError(f"{what} have {codes.shape[1]} bytes a row, but the index holds {self.hash_bit}-bit "
                             f"codes ({self.code_bytes} bytes)")
        padding = (1 << (-self.hash_bit % 8)) - 1
        if padding and len(codes) and np.any(codes[:, -1] & padding):
            raise ValueError(f"{what} have bits set beyond bit {self.hash_bit}: they are not "
                             f"{self.hash_bit}-bit packed codes")
        return np.ascontiguousarray(codes)

    def add(self, codes, ids=None):
        """Add packed codes under `ids` (default: the ids after the largest one held, or 0..N-1 when empty).
        ValueError for an id already held or given twice. Multi-index tables are changed in place (each
        array copied once), not rebuilt; change an index in batches."""
        codes = self._packed(codes, "codes")
        held_ids = self.backend.store.ids
        if ids is None:
            first = int(held_ids[-1]) + 1 if len(held_ids) else 0
            ids = np.arange(first, first + len(codes), dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (len(codes),) or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D integer array of one id per code ({len(codes)}), got "
                             f"{ids.dtype} of shape {ids.shape}")
        ids = ids.astype(np.int64)
        if len(ids) and ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks a missing result), got {ids.min()}")
        ordered = np.sort(ids)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(repeated):
            raise ValueError(f"ids given more than once: {', '.join(map(str, repeated[:5]))}")
        held = self.backend.store.held(ordered)
        if len(held):
            raise ValueError(f"ids already in the index: {', '.join(map(str, held[:5]))}; remove them first")
        if len(ids):
            self.backend.add(codes, ids)

    def remove(self, ids):
        """Remove the codes of `ids`; ids not held are ignored. Returns how many were removed."""
        return self.backend.remove(np.asarray(ids, dtype=np.int64).ravel())

    # ---------- search ----------

    def search(self, queries, k):
        """(distances, ids), int32 and int64 arrays of shape (Q, min(k, len(self))): each query's k nearest
        codes by Hamming distance, ties by id (FAISS would give k columns, padded with id -1)."""
        queries = self._packed(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        distances, ids = self.backend.search(queries, min(int(k), len(self)))
        return distances.astype(np.int32, copy=False), ids

    def search_radius(self, queries, radius):
        """[(distances, ids)] per query: every code within Hamming distance `radius` (<=, where FAISS's
        range_search keeps d < radius), ties by id; a list of pairs, not FAISS's (lims, D, I)."""
        queries = self._packed(queries, "queries")
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
        return self.backend.search_radius(queries, min(int(radius), self.hash_bit))

    # ---------- file ----------

    def _header(self, structure):
        header = {"format": FORMAT_VERSION, "hash_bit": self.hash_bit, "rows": len(self), "method": self.method,
                  "options": self.options,
                  "structure": [{"name": name, "dtype": array.dtype.newbyteorder("<").str, "shape": list(array.shape)}
                                for name, array in structure.items()]}
        text = json.dumps(header, sort_keys=True).encode()
        data_offset = _aligned(len(MAGIC) + 4 + len(text))
        return text + b" " * (data_offset - len(MAGIC) - 4 - len(text))

    def save(self, path):
        """Write the index to `path` atomically (the file format is in this module's docstring), with its
        search structure; an existing file is replaced only when it is an index file itself (begins with
        MAGIC), never a file of another kind."""
        path = check_output_target(path, "index file", earlier_output=("a Hamming index file", is_index_file))
        structure = {name: np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                     for name, array in self.backend.arrays().items()}
        header = self._header(structure)
        arrays = [np.ascontiguousarray(self.backend.store.codes), np.ascontiguousarray(self.ids, dtype="<i8"),
                  *structure.values()]

        def write(handle):
            written = handle.write(MAGIC + struct.pack("<I", len(header)) + header)
            for number, array in enumerate(arrays):  # no copy of a large array
                if number >= 2:  # the structure's arrays start aligned (the ids follow the codes, as in format 1)
                    written += handle.write(b"\0" * (_aligned(written) - written))
                written += handle.write(memoryview(array.reshape(-1).view(np.uint8)))
        atomic_write(path, write, binary=True)

    @classmethod
    def load(cls, path, method=None, mmap=False, **options):
        """The index saved at `path`, searched with its saved method and options unless `method` (and its
        `options`) are given; mmap=True maps the codes, ids and saved tables instead of reading them. A saved
        search structure is used when the method and options are the saved ones (format 1 files have none:
        it is built at the first search). UserError for a file that is not a complete index."""
        path = require_regular_file(path, "index file", missing="pass the path of a file written by "
                                                                "HammingIndex.save")
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header, data_offset = _read_header(handle, path)
            hash_bit, rows = header["hash_bit"], header["rows"]
            layout = _layout(header, data_offset)
            expected = layout[-1][1][1]
            if size != expected:
                state = "is truncated" if size < expected else f"has {size - expected:,} bytes more than that"
                raise UserError(f"index file {path} {state}: its header declares {rows:,} codes of {hash_bit} bits "
                                f"({expected:,} bytes) and the file has {size:,} bytes; save the index again")
            saved = method is None or (method == header["method"] and not options)
            if method is None:
                method, options = header["method"], header["options"]
            index = cls(hash_bit, method, **options)
            arrays = {name: _read_array(handle, path, offset, dtype, shape, mmap)
                      for name, (offset, _end), dtype, shape in _described(header, layout)}
        codes, ids = arrays.pop("codes"), arrays.pop("ids")
        try:
            index._packed(codes, "codes")
        except ValueError:
            raise UserError(f"index file {path} is damaged (codes with bits beyond bit {hash_bit}); save the index "
                            "again") from None
        if rows and (ids[0] < 0 or np.any(ids[1:] <= ids[:-1])):
            raise UserError(f"index file {path} is damaged (its ids are not increasing and >= 0); save the index "
                            "again")
        if not index.backend.restore(codes, ids.astype(np.int64, copy=False), arrays if saved else {}):
            index.backend.restore(codes, ids.astype(np.int64, copy=False), {})  # rebuilt at the first search
        return index


def _aligned(offset):
    return -(-offset // ALIGNMENT) * ALIGNMENT


def is_index_file(path):
    """Whether `path` is a regular file that begins with MAGIC: the one kind of existing file save() replaces."""
    with open_regular(path, "index file") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def _read_header(handle, path):
    """(header dict, offset of the arrays) of an open index file; UserError for anything unexpected."""
    def damaged(reason):
        return UserError(f"index file {path} {reason}; pass a file written by HammingIndex.save, or save it again")

    if handle.read(len(MAGIC)) != MAGIC:
        raise damaged("is not a Hamming index of this project (its first bytes differ)")
    length_bytes = handle.read(4)
    if len(length_bytes) < 4:
        raise damaged("is truncated within its header")
    length = struct.unpack("<I", length_bytes)[0]
    if length > MAX_HEADER_BYTES:
        raise damaged(f"declares a {length:,}-byte header, more than the {MAX_HEADER_BYTES:,} allowed")
    text = handle.read(length)
    if len(text) < length:
        raise damaged("is truncated within its header")
    header = parse_json(text, f"index file {path}", "pass a file written by HammingIndex.save, or save it again")
    if not isinstance(header, dict) or header.get("format") not in READABLE_VERSIONS:
        raise damaged(f"has format {header.get('format') if isinstance(header, dict) else '?'}, not one of "
                      f"{', '.join(map(str, READABLE_VERSIONS))}")
    hash_bit, rows, method = header.get("hash_bit"), header.get("rows"), header.get("method")
    if not isinstance(hash_bit, int) or not 1 <= hash_bit <= MAX_HASH_BIT:
        raise damaged(f"declares {hash_bit!r} bits a code")
    if not isinstance(rows, int) or rows < 0:
        raise damaged(f"declares {rows!r} codes")
    if method not in METHODS or not isinstance(header.get("options"), dict):
        raise damaged(f"names an unknown search method or options ({method!r}, {header.get('options')!r})")
    problem = option_problem(method, header["options"], hash_bit)
    if problem:
        raise damaged(f"names options that are out of bounds: {problem}")
    if not _valid_structure(header.setdefault("structure", [])):
        raise damaged("describes its search structure wrongly")
    return header, len(MAGIC) + 4 + length


def _valid_structure(structure):
    """Whether a header's "structure" is a short list of distinctly named arrays of known dtypes and shapes."""
    if not isinstance(structure, list) or len(structure) > 8:
        return False
    names = set()
    for entry in structure:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            return False
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or name in names | {"codes", "ids"} or dtype not in STRUCTURE_DTYPES or \
                not isinstance(shape, list) or len(shape) > 4 or \
                not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            return False
        names.add(name)
    return True


def _described(header, layout):
    """(name, (offset, end), dtype, shape) of every array of the file: codes, ids, the structure's."""
    rows, code_bytes = header["rows"], -(-header["hash_bit"] // 8)
    described = [("codes", np.uint8, (rows, code_bytes)), ("ids", "<i8", (rows,))] + \
        [(entry["name"], entry["dtype"], tuple(entry["shape"])) for entry in header["structure"]]
    return [(name, place, dtype, shape) for (name, dtype, shape), (_, place) in zip(described, layout)]


def _layout(header, data_offset):
    """[(name, (offset, end))] of the arrays, the codes at data_offset, the ids right after them, each array of
    the structure at the next multiple of ALIGNMENT; the last end is the file's size."""
    rows, code_bytes = header["rows"], -(-header["hash_bit"] // 8)
    codes_end = data_offset + rows * code_bytes
    layout = [("codes", (data_offset, codes_end)), ("ids", (codes_end, codes_end + 8 * rows))]
    for entry in header["structure"]:
        start = _aligned(layout[-1][1][1])
        layout.append((entry["name"], (start, start + 8 * math.prod(entry["shape"]))))
    return layout


def _read_array(handle, path, offset, dtype, shape, mmap):
    """The array stored at `offset`, read or memory-mapped (its place within the file's size is checked)."""
    count = math.prod(shape)
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    handle.seek(offset)
    array = np.fromfile(handle, dtype=dtype, count=count)
    if len(array) < count:  # the file shrank since its size was checked
        raise UserError(f"index file {path} is truncated; save the index again")
    return array.reshape(shape)
