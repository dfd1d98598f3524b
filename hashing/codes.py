"""Binary hash codes in one packed layout, shared by the evaluation, the codes cache and the search.

A network's real-valued outputs x (N, n) give the codes b = sign(x), +1 for x >= 0 (docs/METHOD.md §3.1).
Codes are stored as the rows of np.packbits(x >= 0): uint8 (N, ceil(n / 8)), big-endian bit order within
a byte, padded with zero bits to whole bytes. That is the byte layout FAISS's IndexBinaryFlat takes, and
the padding bits, 0 in every row, add nothing to a Hamming distance. Multi-hot labels are packed the
same way, so that "shares a label" is a non-zero AND and the number of shared labels a popcount.

For popcounts the byte rows are viewed as unsigned words of up to 64 bits (`word_columns`): XOR and
popcount do not depend on the bit order, so the view needs no repacking.

Names: `outputs` are real-valued network outputs, `bits` packed rows, `signs` codes in {-1, +1}.

Counts (Hamming distances, shared labels) are held in the smallest unsigned integer type that holds their
largest possible value (`count_dtype`): a distance of n-bit codes needs uint8 up to 255 bits, uint16 up to
65,535, uint32 beyond; a count of shared labels the same by the number of classes.
"""
import numbers
from dataclasses import dataclass

import numpy as np


def as_numpy(array):
    """A numpy view of a numpy array or torch tensor (moved to the CPU if needed)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _pack_rows(matrix, what):
    matrix = as_numpy(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (items, {'bits' if what == 'codes' else 'classes'}) array, "
                         f"got shape {matrix.shape}")
    return np.packbits(matrix > 0 if what == "labels" else matrix >= 0, axis=1)


class NonFiniteCodes(ValueError):
    """Outputs with NaN or infinite entries: they have no sign, and ranking them would give a figure
    that means nothing (a NaN model once scored mAP 0.83), so they are refused."""


def pack_signs(outputs):
    """Real-valued or +-1 (N, n) outputs -> packed sign bits (N, ceil(n / 8)) uint8; 0 counts as +1.
    NonFiniteCodes when an output is NaN or infinite."""
    finite = np.isfinite(as_numpy(outputs))
    if not finite.all():
        raise NonFiniteCodes(f"{np.count_nonzero(~finite)} of {finite.size} network outputs are NaN or infinite")
    return _pack_rows(outputs, "codes")


def prefix_bits(bits, length):
    """The packed codes of the first `length` bits of packed rows `bits`: whole leading bytes, the bits past
    `length` in the last one cleared (bits run big-endian within a byte, so bit j of a code is bit 7 - j % 8
    of byte j // 8, and this equals pack_signs(outputs[:, :length]))."""
    num_bytes = -(-length // 8)
    if not 1 <= length <= 8 * bits.shape[1]:
        raise ValueError(f"a prefix of {length} bits does not fit packed rows of {bits.shape[1]} bytes")
    prefix = np.array(bits[:, :num_bytes], dtype=np.uint8)
    if length % 8:
        prefix[:, -1] &= (0xFF << (8 - length % 8)) & 0xFF
    return prefix


def pack_labels(labels):
    """Multi-hot (N, C) labels (an entry counts when > 0) -> packed (N, ceil(C / 8)) uint8."""
    return _pack_rows(labels, "labels")


def unpack_signs(bits, hash_bit):
    """Packed rows -> (N, hash_bit) int8 codes in {-1, +1}."""
    return np.unpackbits(bits, axis=1, count=hash_bit).astype(np.int8) * 2 - 1


def unpack_labels(bits, num_classes):
    """Packed rows -> (N, num_classes) bool multi-hot labels."""
    return np.unpackbits(bits, axis=1, count=num_classes).astype(bool)


def word_columns(bits):
    """Packed (N, B) uint8 rows viewed as contiguous columns of unsigned words, one array per word.

    Up to 8 bytes use one word of the smallest sufficient width (uint8/16/32/64), so that gathers and
    XORs move as few bytes as possible; longer rows use ceil(B / 8) uint64 words.
    """
    num_rows, num_bytes = bits.shape
    width = next((w for w in (1, 2, 4, 8) if num_bytes <= w), 8)
    padded_bytes = -(-num_bytes // width) * width
    padded = np.zeros((num_rows, padded_bytes), dtype=np.uint8)
    padded[:, :num_bytes] = bits
    words = padded.view(np.dtype(f"uint{8 * width}"))
    return [np.ascontiguousarray(words[:, column]) for column in range(words.shape[1])]


def count_dtype(largest):
    """The smallest unsigned integer dtype that holds every count 0..largest."""
    return next(np.dtype(dtype) for dtype in (np.uint8, np.uint16, np.uint32, np.uint64)
                if largest <= np.iinfo(dtype).max)


def popcount_sum(blocks, largest):
    """The sum of the popcounts of the word arrays `blocks` (an iterable), in count_dtype(largest): np.bitwise_count
    gives uint8, which a sum over several words would wrap past 255."""
    total = None
    for block in blocks:
        count = np.bitwise_count(block)
        total = count.astype(count_dtype(largest), copy=False) if total is None else np.add(total, count, out=total)
    return total


def hamming_distances(query_words, database_words, hash_bit):
    """(m, N) Hamming distances between word columns of packed query and database codes (count_dtype(hash_bit))."""
    return popcount_sum((query[:, None] ^ database[None, :] for query, database in zip(query_words, database_words)),
                        hash_bit)


def _check_packed(name, rows):
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2:
        found = f"shape {rows.shape} of {rows.dtype}" if isinstance(rows, np.ndarray) else type(rows).__name__
        raise ValueError(f"{name} must be a 2-D uint8 array, got {found}")


def _check_width(name, width, rows, rows_name):
    """`width` (bits or classes) must be an integer that fills the packed rows' bytes (the last one partly),
    and every padding bit beyond it 0: padding bits set would count in every distance and shared label."""
    num_bytes = rows.shape[1]
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or \
            not max(1, 8 * num_bytes - 7) <= width <= 8 * num_bytes:
        raise ValueError(f"{name} {width} does not fit packed rows of {num_bytes} bytes")
    spare = 8 * num_bytes - width
    if spare and len(rows) and (rows[:, -1] & ((1 << spare) - 1)).any():
        raise ValueError(f"{rows_name} has padding bits set beyond bit {width}: not rows of np.packbits")


STORED_ARRAYS = ("query_bits", "query_labels", "database_bits", "database_labels", "hash_bit", "num_classes")


@dataclass
class CodeSet:
    """Packed codes and packed multi-hot labels of the query set and the database.

    Checked when made: uint8 (N, B) rows, a code length and class count that fit them (at least 1), padding bits
    0, and the same widths on both sides; ValueError otherwise (a crafted codes cache is refused here)."""
    query_bits: np.ndarray
    query_labels: np.ndarray
    database_bits: np.ndarray
    database_labels: np.ndarray
    hash_bit: int
    num_classes: int

    def __post_init__(self):
        for side in ("query", "database"):
            bits, labels = getattr(self, f"{side}_bits"), getattr(self, f"{side}_labels")
            _check_packed(f"{side}_bits", bits)
            _check_packed(f"{side}_labels", labels)
            if len(bits) != len(labels):
                raise ValueError(f"{len(bits)} {side} codes but {len(labels)} {side} label rows")
        if self.query_bits.shape[1] != self.database_bits.shape[1]:
            raise ValueError(f"query codes have {self.query_bits.shape[1]} bytes but database codes "
                             f"{self.database_bits.shape[1]}")
        if self.query_labels.shape[1] != self.database_labels.shape[1]:
            raise ValueError("query and database labels have different numbers of classes")
        for side in ("query", "database"):
            _check_width("hash_bit", self.hash_bit, getattr(self, f"{side}_bits"), f"{side}_bits")
            _check_width("num_classes", self.num_classes, getattr(self, f"{side}_labels"), f"{side}_labels")

    @classmethod
    def from_stored(cls, arrays):
        """A CodeSet from the arrays of a codes cache file (hashing/cache.py): its four packed arrays and the
        0-d integers hash_bit and num_classes. ValueError naming what is missing or malformed."""
        missing = [name for name in STORED_ARRAYS if name not in arrays]
        if missing:
            raise ValueError(f"it has no {', '.join(missing)}")
        widths = {}
        for name in ("hash_bit", "num_classes"):
            value = arrays[name]
            if value.shape != () or value.dtype.kind not in "iu":
                raise ValueError(f"{name} is not one integer ({value.dtype} of shape {value.shape})")
            widths[name] = int(value)
        return cls(arrays["query_bits"], arrays["query_labels"], arrays["database_bits"], arrays["database_labels"],
                   widths["hash_bit"], widths["num_classes"])

    @classmethod
    def from_outputs(cls, query_outputs, query_labels, database_outputs, database_labels):
        """From real-valued (or +-1) outputs and multi-hot labels, numpy arrays or torch tensors."""
        query_outputs, database_outputs = as_numpy(query_outputs), as_numpy(database_outputs)
        query_labels, database_labels = as_numpy(query_labels), as_numpy(database_labels)
        if query_outputs.ndim != 2 or database_outputs.ndim != 2:
            raise ValueError(f"codes must be 2-D (items, bits) arrays, got shapes {query_outputs.shape} and "
                             f"{database_outputs.shape}")
        if query_outputs.shape[1] != database_outputs.shape[1]:
            raise ValueError(f"query codes have {query_outputs.shape[1]} bits but database codes have "
                             f"{database_outputs.shape[1]}")
        if query_labels.ndim != 2 or database_labels.ndim != 2 or query_labels.shape[1] != database_labels.shape[1]:
            raise ValueError("query and database labels must be 2-D with the same number of classes, got shapes "
                             f"{query_labels.shape} and {database_labels.shape}")
        return cls(pack_signs(query_outputs), pack_labels(query_labels), pack_signs(database_outputs),
                   pack_labels(database_labels), query_outputs.shape[1], query_labels.shape[1])

    def stored_arrays(self):
        """The arrays from_stored reads back (np.savez keywords)."""
        return {"hash_bit": np.array(self.hash_bit), "num_classes": np.array(self.num_classes),
                "query_bits": self.query_bits, "database_bits": self.database_bits,
                "query_labels": self.query_labels, "database_labels": self.database_labels}

    def prefix(self, length):
        """The CodeSet of the first `length` bits of every code (nested codes, docs/METHOD.md §14)."""
        if not 1 <= length <= self.hash_bit:
            raise ValueError(f"a prefix of {length} bits of {self.hash_bit}-bit codes")
        if length == self.hash_bit:
            return self
        return CodeSet(prefix_bits(self.query_bits, length), self.query_labels, prefix_bits(self.database_bits, length),
                       self.database_labels, length, self.num_classes)

    def query_signs(self):
        return unpack_signs(self.query_bits, self.hash_bit)

    def database_signs(self):
        return unpack_signs(self.database_bits, self.hash_bit)

    def query_label_matrix(self):
        return unpack_labels(self.query_labels, self.num_classes)

    def database_label_matrix(self):
        return unpack_labels(self.database_labels, self.num_classes)
