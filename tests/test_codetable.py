import csv
import math
from pathlib import Path

import pytest

from hashing import codetable

# d(n, k) for n = 1..256, k = 1..10 as listed in Grassl's tables, kept as data independent of hashing/codetable.py
REFERENCE_CSV = Path(__file__).resolve().parent / "data" / "best_known_min_distance.csv"


def griesmer_bound(n, k):
    """Largest d with sum_{i<k} ceil(d / 2^i) <= n (an upper bound on d of any [n, k] code)."""
    d = 0
    while sum(math.ceil((d + 1) / 2 ** i) for i in range(k)) <= n:
        d += 1
    return d


@pytest.mark.parametrize("hash_bit, num_classes, expected", [
    (48, 20, 0.0),          # VOC: k = 5, d(48, 5) = 24
    (24, 38, 1 - 20 / 24),  # Flickr: k = 6, d(24, 6) = 10
    (12, 21, 1 - 8 / 12),   # NUS-WIDE: k = 5, d(12, 5) = 4
    (16, 20, 1 - 16 / 16),  # d(16, 5) = 8
    (64, 80, 0.0),          # COCO: k = 7, d(64, 7) = 32
    (32, 10, 1 - 32 / 32),  # digits: k = 4, d(32, 4) = 16
])
def test_zeta_hand_worked(hash_bit, num_classes, expected):
    assert codetable.zeta(hash_bit, num_classes) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, k, table", [(12, 5, 4), (16, 6, 6), (24, 6, 10), (32, 7, 14), (48, 7, 22),
                                         (64, 8, 29)])
def test_griesmer_mismatches_use_the_table(n, k, table):
    assert codetable.min_distance(n, k) == table
    assert griesmer_bound(n, k) > table


def test_known_code_families():
    for n in range(1, 257):
        assert codetable.min_distance(n, 1) == n                 # repetition code
        if n >= 2:
            assert codetable.min_distance(n, 2) == 2 * n // 3    # optimal two-dimensional codes
    for m in range(2, 9):
        assert codetable.min_distance(2 ** m - 1, m) == 2 ** (m - 1)   # simplex codes
        if m + 1 <= 10:
            assert codetable.min_distance(2 ** m, m + 1) == 2 ** (m - 1)   # first-order Reed-Muller


def test_table_is_consistent():
    for k in range(1, 11):
        previous = 0
        for n in range(k, 257):
            d = codetable.min_distance(n, k)
            assert previous <= d <= griesmer_bound(n, k)
            previous = d
        if k > 1:
            assert all(codetable.min_distance(n, k) <= codetable.min_distance(n, k - 1) for n in range(k, 257))


def test_matches_the_reference_table():
    with open(REFERENCE_CSV) as handle:
        rows = [row for row in csv.reader(handle) if row and not row[0].startswith("#")][1:]
    for row in rows:
        for k, cell in enumerate(row[1:], start=1):
            if cell:
                assert codetable.min_distance(int(row[0]), k) == int(cell), (row[0], k)


@pytest.mark.parametrize("hash_bit, num_classes", [(257, 20), (48, 2000), (4, 100), (0, 20)])
def test_out_of_range_is_a_clear_error(hash_bit, num_classes):
    with pytest.raises(ValueError, match="table covers|positive integer"):
        codetable.zeta(hash_bit, num_classes)


def test_single_class_uses_k_1():
    assert codetable.zeta(8, 1) == -1.0


def _paper_style_workbook(path, overrides=()):
    """A codetable.xlsx laid out like the paper's: row n, column k holds zeta; row 0 and column 0 are headers."""
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.cell(row=1, column=1, value="n \\ k")
    for k in range(1, 11):
        sheet.cell(row=1, column=k + 1, value=f"k={k}")
    for n in range(1, 65):
        sheet.cell(row=n + 1, column=1, value=n)
        for k in range(1, min(n, 10) + 1):
            sheet.cell(row=n + 1, column=k + 1, value=1 - 2 * codetable.min_distance(n, k) / n)
    for (n, k), value in dict(overrides).items():
        sheet.cell(row=n + 1, column=k + 1, value=value)
    book.save(path)
    return path


def test_reads_the_papers_workbook_without_xlrd(tmp_path):
    path = _paper_style_workbook(tmp_path / "codetable.xlsx")
    for n, classes in [(48, 20), (24, 38), (12, 21), (64, 80)]:
        assert codetable.zeta_from_workbook(path, n, classes) == pytest.approx(codetable.zeta(n, classes))


def test_workbook_disagreement_warns_and_uses_the_workbook(tmp_path):
    path = _paper_style_workbook(tmp_path / "codetable.xlsx", overrides={(48, 5): 0.125})
    value, warning = codetable.resolve_zeta(48, 20, workbook=path)
    assert value == 0.125 and "built-in table gives 0.000000" in warning
    assert codetable.resolve_zeta(48, 20, override=0.3, workbook=path) == (0.3, None)
    assert codetable.resolve_zeta(48, 20) == (0.0, None)


def test_a_workbook_that_unpacks_to_gigabytes_is_refused_unread(tmp_path, monkeypatch):
    import zipfile
    bomb = tmp_path / "bomb.xlsx"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("xl/worksheets/sheet1.xml", b"\0" * (codetable.MAX_WORKBOOK_BYTES + 1))
    assert bomb.stat().st_size < 1 << 20

    def must_not_parse(*args, **kwargs):
        raise AssertionError("the workbook was parsed")
    monkeypatch.setattr("openpyxl.load_workbook", must_not_parse)
    with pytest.raises(ValueError, match="bomb.xlsx unpacks to 67,108,865 bytes"):
        codetable.zeta_from_workbook(bomb, 48, 20)


def test_workbook_errors_name_the_file(tmp_path):
    bad = tmp_path / "not_a_workbook.xlsx"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not_a_workbook.xlsx"):
        codetable.zeta_from_workbook(bad, 48, 20)
    path = _paper_style_workbook(tmp_path / "codetable.xlsx")
    with pytest.raises(ValueError, match="no value at row 128"):
        codetable.zeta_from_workbook(path, 128, 20)


def test_a_workbook_that_understates_its_unpacked_size_is_read_only_as_far_as_it_says(tmp_path):
    """A zip bomb may declare small sizes: zipfile stops at the declared size, so the cap still holds."""
    import struct
    import tracemalloc
    import zipfile
    bomb = tmp_path / "lying.xlsx"
    _paper_style_workbook(bomb)
    with pytest.warns(UserWarning, match="Duplicate name"), \
            zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("xl/worksheets/sheet1.xml", b"<" * (32 << 20))  # replaces the sheet, 32 MiB
    data = bytearray(bomb.read_bytes())
    for signature, size_offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if struct.unpack_from("<I", data, start + size_offset)[0] == 32 << 20:
                struct.pack_into("<I", data, start + size_offset, 1000)  # claim 1,000 bytes
            start += 4
    bomb.write_bytes(data)
    tracemalloc.start()
    with pytest.raises(ValueError, match="cannot read .*lying.xlsx as an .xlsx workbook"):
        codetable.zeta_from_workbook(bomb, 48, 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("old, new", [
    (b' r="B2"', b' r="??"'),  # a bad cell reference
    (b' r="B', b' x="B'),  # cells without r
    (b'<row r="', b'<row x="'),  # rows without r
    (b't="inlineStr"><is><t>k=1</t></is>', b't="s"><v>99999</v>'),  # a shared-string index out of range
])
def test_malformed_workbook_cells_give_a_value_error_naming_the_file(tmp_path, old, new):
    import zipfile
    good = _paper_style_workbook(tmp_path / "good.xlsx")
    bad = tmp_path / "bad.xlsx"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for item in source.infolist():
            content = source.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                assert old in content
                content = content.replace(old, new)
            target.writestr(item, content)
    try:
        value = codetable.zeta_from_workbook(bad, 48, 20)
    except ValueError as exc:  # any other exception type would be a traceback
        assert "bad.xlsx" in str(exc)
    else:  # openpyxl tolerated the damage; then it must still read the right cell
        assert value == pytest.approx(codetable.zeta(48, 20))
