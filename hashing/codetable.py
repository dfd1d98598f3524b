"""The threshold zeta of HyP2/HHF from the best known binary linear codes.

zeta(n, C) = 1 - 2 d(n, k) / n with k = ceil(log2 C): the cosine between two +-1 codes of n bits at
Hamming distance d, where d(n, k) is the best known minimum distance of a binary linear [n, k] code
(Grassl's tables, n <= 256, k <= 10). The Griesmer bound is not a substitute: it overestimates d for
(12, 5), (16, 6), (24, 6), (32, 7), (48, 7) and (64, 8), among others.

The table is stored as differences: d(k, k) = 1, and _STEPS[k][n - k - 1] = d(n, k) - d(n - 1, k),
one digit per code length n = k+1 .. 256. The paper's code reads it from codetable.xlsx through xlrd,
which no longer reads .xlsx files; `zeta_from_workbook` reads that workbook with openpyxl for
cross-checking (--codetable). Formulas and examples: docs/METHOD.md §1.
"""
import math
import zipfile
from functools import lru_cache

from utils.errors import UserError
from utils.paths import open_regular

MAX_BITS = 256
MAX_DIMENSION = 10

_STEPS = {
    1: (
        "11111111111111111111111111111111111111111111111111111111111111111111111111111111"
        "11111111111111111111111111111111111111111111111111111111111111111111111111111111"
        "11111111111111111111111111111111111111111111111111111111111111111111111111111111"
        "111111111111111"
    ),
    2: (
        "10110110110110110110110110110110110110110110110110110110110110110110110110110110"
        "11011011011011011011011011011011011011011011011011011011011011011011011011011011"
        "01101101101101101101101101101101101101101101101101101101101101101101101101101101"
        "10110110110110"
    ),
    3: (
        "10110011011001101100110110011011001101100110110011011001101100110110011011001101"
        "10011011001101100110110011011001101100110110011011001101100110110011011001101100"
        "11011001101100110110011011001101100110110011011001101100110110011011001101100110"
        "1100110110011"
    ),
    4: (
        "10110011011000110110011011000110110011011000110110011011000110110011011000110110"
        "01101100011011001101100011011001101100011011001101100011011001101100011011001101"
        "10001101100110110001101100110110001101100110110001101100110110001101100110110001"
        "101100110110"
    ),
    5: (
        "10011001111000110110011011000011011001101100011011001101100001101100110110001101"
        "10011011000011011001101100011011001101100001101100110110001101100110110000110110"
        "01101100011011001101100001101100110110001101100110110000110110011011000110110011"
        "01100001101"
    ),
    6: (
        "10011001101100011011001111000011001101101100011011001101100000110110011011000110"
        "11001101100001101100110110001101100110110000011011001101100011011001101100001101"
        "10011011000110110011011000001101100110110001101100110110000110110011011000110110"
        "0110110000"
    ),
    7: (
        "10011001101100011011000110110001101100110110000110110111100000110011001101100011"
        "01101101100001101100110110001101100110110000001101100110110001101100110110000110"
        "11001101100011011001101100000110110011011000110110011011000011011001101100011011"
        "001101100"
    ),
    8: (
        "10011001101100001101100110110000110110110110000011011001101100001101100110110001"
        "10110011011000011011001101100011001111110000001100110011011000110110011011000011"
        "01100110110001101101101100000110011001101100110110011011000011011001101100011011"
        "00110110"
    ),
    9: (
        "10011001101100001101100011011000110110001101100011011000200110000200200020020000"
        "11011000200200001101100020020000200200020011000002002000200200002001100200200000"
        "11011002002000020011001101100000200110011011000200200020011000011011000200200020"
        "0111111"
    ),
    10: (
        "10011000111100001101100002001100020020000200200002002000110110000110110011011000"
        "02002000110110000200200020020000110020001101100001011010110110001011010101011000"
        "10110100110110002002000110110000011011001101100020020002002000001011001101010101"
        "011010"
    ),
}


@lru_cache(maxsize=None)
def _distances(k):
    """d(n, k) for n = k .. MAX_BITS as a tuple (index n - k)."""
    d = [1]
    for step in _STEPS[k]:
        d.append(d[-1] + int(step))
    return tuple(d)


def code_dimension(num_classes):
    """k = ceil(log2 C): the number of information bits needed to give every class its own code."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return max(1, math.ceil(math.log2(num_classes)))


def min_distance(hash_bit, k):
    """Best known minimum distance d(n, k) of a binary linear [n, k] code."""
    if not 1 <= k <= MAX_DIMENSION:
        raise ValueError(f"the built-in code table covers dimensions k = 1..{MAX_DIMENSION}, got k = {k}")
    if not k <= hash_bit <= MAX_BITS:
        raise ValueError(
            f"the built-in code table covers {k} <= n <= {MAX_BITS} for k = {k}, got n = {hash_bit}")
    return _distances(k)[hash_bit - k]


def zeta(hash_bit, num_classes):
    """HyP2's threshold: 1 - 2 d(n, ceil(log2 C)) / n.

    Raises ValueError (naming the limits) outside n <= 256, C <= 1024, or when n < ceil(log2 C).
    """
    if not isinstance(hash_bit, int) or hash_bit < 1:
        raise ValueError(f"hash_bit must be a positive integer, got {hash_bit!r}")
    k = code_dimension(num_classes)
    if k > MAX_DIMENSION or hash_bit > MAX_BITS or hash_bit < k:
        raise ValueError(
            f"no best-known code distance for n = {hash_bit} bits and k = {k} (C = {num_classes} classes): "
            f"the built-in table covers {k} <= n <= {MAX_BITS} and C <= {2 ** MAX_DIMENSION}")
    return 1.0 - 2.0 * min_distance(hash_bit, k) / hash_bit


# The paper's codetable.xlsx unpacks to ~0.1 MB; a workbook that claims more than this is refused before
# any of it is decompressed (a small zip can expand to gigabytes).
MAX_WORKBOOK_BYTES = 64 << 20


def _check_unpacked_size(handle, path):
    try:
        with zipfile.ZipFile(handle) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read {path} as an .xlsx workbook ({exc})") from None
    if unpacked > MAX_WORKBOOK_BYTES:
        raise ValueError(f"{path} unpacks to {unpacked:,} bytes, more than a code table needs "
                         f"({MAX_WORKBOOK_BYTES:,}); it is not the paper's codetable.xlsx")


def read_workbook_cell(path, row, column):
    """Value of the first sheet's cell at 0-based (row, column), as xlrd's sheet.row(row)[column]. The workbook
    is read only from a regular file (a FIFO would block, a device be read without end), as one open file."""
    import openpyxl
    try:
        handle = open_regular(path, "workbook", MAX_WORKBOOK_BYTES)
    except UserError as exc:
        raise ValueError(str(exc)) from None
    with handle:
        _check_unpacked_size(handle, path)
        handle.seek(0)
        try:
            workbook = openpyxl.load_workbook(handle, read_only=True, data_only=True)
            try:
                cells = workbook.worksheets[0].iter_rows(min_row=row + 1, max_row=row + 1, min_col=column + 1,
                                                         max_col=column + 1, values_only=True)
                return next(iter(cells), (None,))[0]
            finally:
                workbook.close()
        except Exception as exc:  # openpyxl raises many types on malformed workbooks; all mean "not readable"
            raise ValueError(f"cannot read {path} as an .xlsx workbook ({type(exc).__name__}: {exc})") from None


def zeta_from_workbook(path, hash_bit, num_classes):
    """zeta as the paper's code reads it: row n, column ceil(log2 C) of codetable.xlsx's first sheet.

    The paper's workbook holds zeta itself; a cell holding a distance (> 1) is converted to zeta.
    """
    k = code_dimension(num_classes)
    raw = read_workbook_cell(path, hash_bit, k)
    if raw is None:
        raise ValueError(f"{path} has no value at row {hash_bit}, column {k} (n = {hash_bit}, k = {k})")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{path} row {hash_bit}, column {k} holds {raw!r}, not a number") from None
    return 1.0 - 2.0 * value / hash_bit if value > 1 else value


def check_zeta(value):
    """zeta as a float, or ValueError unless it is a finite cosine in [-1, 1) (docs/METHOD.md §1): the
    one rule for --zeta and for a workbook's cell."""
    value = float(value)
    if not (math.isfinite(value) and -1 <= value < 1):
        raise ValueError(f"must be a cosine in [-1, 1), got {value:g}")
    return value


def resolve_zeta(hash_bit, num_classes, override=None, workbook=None):
    """(zeta, warning or None): --zeta if given, else the workbook's value (--codetable) if given, else
    the built-in table. The warning says when the workbook and the built-in table disagree (the
    workbook's value is used). Raises ValueError where no source has a value.
    """
    if override is not None:
        return check_zeta(override), None
    if workbook is None:
        return zeta(hash_bit, num_classes), None
    from_workbook = zeta_from_workbook(workbook, hash_bit, num_classes)
    try:
        check_zeta(from_workbook)
    except ValueError as exc:
        raise ValueError(f"{workbook} row {hash_bit}, column {code_dimension(num_classes)}: zeta {exc}") from None
    try:
        built_in = zeta(hash_bit, num_classes)
    except ValueError:
        return from_workbook, None
    if abs(from_workbook - built_in) > 1e-6:
        return from_workbook, (f"{workbook} gives zeta = {from_workbook:.6f} for n = {hash_bit}, C = {num_classes}; "
                               f"the built-in table gives {built_in:.6f}. Using the workbook's value.")
    return from_workbook, None
