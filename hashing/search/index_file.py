"""The Hamming index file (format 2): save() writes atomically MAGIC, a little-endian uint32 header length, a
JSON header (format, hash_bit, rows, method, options, structure: the name, dtype and shape of each array of the
search structure) padded to a multiple of 64 bytes, the codes (rows x ceil(hash_bit / 8) bytes), the ids (rows
little-endian int64), then each array of the structure from the next multiple of 64 bytes. Format 1 files
(codes and ids only, no "structure") still load.

read_index_file refuses anything but a regular file (checked on the descriptor it then reads and maps, so a
file swapped in after the check is never read), checks the header (its method and options within bounds) and
then its declared sizes against the file's size before reading any array, and reads or memory-maps the arrays;
what they mean (ids increasing, padding bits 0, a structure that fits) HammingIndex.load and the backend check.
"""
import json
import math
import os
import struct

import numpy as np

from utils.atomic import atomic_write
from utils.documents import parse_json
from utils.errors import UserError
from utils.paths import check_output_target, open_regular

from hashing.search.options import MAX_HASH_BIT, METHODS, option_problem

MAGIC = b"hyp2-hamming-index\n"
FORMAT_VERSION = 2  # 2: the search structure (multi-index tables) follows the ids; 1: codes and ids only
READABLE_VERSIONS = (1, 2)
MAX_HEADER_BYTES = 1 << 16
ALIGNMENT = 64
# The dtypes a saved search structure's arrays may have.
STRUCTURE_DTYPES = ("<i4", "<i8", "<u8")


def write_index_file(path, header, codes, ids, structure):
    """Write an index file atomically: `header` (format, hash_bit, rows, method, options) completed with the
    description of `structure` ({name: array}); an existing file is replaced only when it is an index file itself
    (begins with MAGIC), never a file of another kind."""
    path = check_output_target(path, "index file", earlier_output=("a Hamming index file", is_index_file))
    structure = {name: np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                 for name, array in structure.items()}
    header = {**header, "format": FORMAT_VERSION,
              "structure": [{"name": name, "dtype": array.dtype.str, "shape": list(array.shape)}
                            for name, array in structure.items()]}
    text = json.dumps(header, sort_keys=True).encode()
    text += b" " * (_aligned(len(MAGIC) + 4 + len(text)) - len(MAGIC) - 4 - len(text))
    arrays = [np.ascontiguousarray(codes), np.ascontiguousarray(ids, dtype="<i8"), *structure.values()]

    def write(handle):
        written = handle.write(MAGIC + struct.pack("<I", len(text)) + text)
        for number, array in enumerate(arrays):  # no copy of a large array
            if number >= 2:  # the structure's arrays start aligned (the ids follow the codes, as in format 1)
                written += handle.write(b"\0" * (_aligned(written) - written))
            written += handle.write(memoryview(array.reshape(-1).view(np.uint8)))
    atomic_write(path, write, binary=True)


def read_index_file(path, mmap=False):
    """(header, codes, ids, {name: array of the structure}) of the index file at `path`, read or memory-mapped;
    UserError for a file that is not a complete index."""
    with open_regular(path, "index file", missing="pass the path of a file written by HammingIndex.save") as handle:
        size = os.fstat(handle.fileno()).st_size  # of the file opened, the one that is read or mapped
        header, data_offset = _read_header(handle, path)
        layout = _layout(header, data_offset)
        expected = layout[-1][1][1]
        if size != expected:
            state = "is truncated" if size < expected else f"has {size - expected:,} bytes more than that"
            raise UserError(f"index file {path} {state}: its header declares {header['rows']:,} codes of "
                            f"{header['hash_bit']} bits ({expected:,} bytes) and the file has {size:,} bytes; save "
                            "the index again")
        arrays = {name: _read_array(handle, path, offset, dtype, shape, mmap)
                  for name, (offset, _end), dtype, shape in _described(header, layout)}
    codes, ids = arrays.pop("codes"), arrays.pop("ids")
    return header, codes, ids.astype(np.int64, copy=False), arrays


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
        size = np.dtype(entry["dtype"]).itemsize * math.prod(entry["shape"])
        layout.append((entry["name"], (start, start + size)))
    return layout


def _read_array(handle, path, offset, dtype, shape, mmap):
    """The array stored at `offset`, read or memory-mapped (its place within the file's size is checked)."""
    count = math.prod(shape)
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    if mmap:
        return np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=shape)
    handle.seek(offset)
    array = np.fromfile(handle, dtype=dtype, count=count)
    if len(array) < count:  # the file shrank since its size was checked
        raise UserError(f"index file {path} is truncated; save the index again")
    return array.reshape(shape)
