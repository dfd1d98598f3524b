"""MS-COCO: the two shipped list families, the database rebuilt from the labelled images, the folder's own lists,
the query-in-database refusal, and a tiny training on a fixture of the real layout."""
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import retrieval
from data import coco, coco_paths
from data.base import DataOptions
from data.files import LabelledPaths
from data.registry import get_dataset_spec
from tests.cli_runs import exit_status
from tests.fixture_files import shipped_coco_rows, write_coco_tree, write_list_folder
from utils.errors import UserError

SPLITS = Path(__file__).resolve().parents[1] / "data" / "splits"
# the git blob ids of the upstream files, as `git ls-tree` lists them in thuml/HashNet (85387b8) and
# swuxyj/DeepHash-pytorch (ab14068)
UPSTREAM_BLOBS = {"coco_hashnet_test.txt": "f3c1b618677d27ad00c03a889d3eba5100eb2d57",
                  "coco_hashnet_train.txt": "523489ab654d08dc306f93cc4e18bec036135349",
                  "coco_deephash_test.txt": "e326d2091ab54672f1116fd93ea2d93fd76052c6",
                  "coco_deephash_train.txt": "2b78ffd61c5ec98234343a8a2321d1378345d1bb"}
EXTRA_IMAGES = {"val2014/COCO_val2014_000000999991.jpg": " ".join(["1"] + ["0"] * 79),
                "train2014/COCO_train2014_000000999992.jpg": " ".join(["0"] * 79 + ["1"])}


@pytest.mark.parametrize("file_name", sorted(UPSTREAM_BLOBS))
def test_shipped_lists_are_the_upstream_files_with_the_protocol_counts(file_name):
    content = gzip.decompress((SPLITS / f"{file_name}.gz").read_bytes())
    assert hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest() == UPSTREAM_BLOBS[file_name]
    rows = [line.split() for line in content.decode().splitlines()]
    assert len(rows) == (5000 if "test" in file_name else 10000)
    assert {len(row) for row in rows} == {81} and all("1" in row[1:] for row in rows)
    listed = coco.shipped_split(file_name, Path("/data/coco"))
    assert listed.labels.shape == (len(rows), 80)
    assert listed.paths[0] == "/data/coco/" + "/".join(rows[0][0].split("/")[-2:])
    assert np.array_equal(listed.labels[0], np.array(rows[0][1:], dtype=np.float32))


@pytest.mark.parametrize("family", ["hashnet", "deephash"])
def test_a_family_trains_on_no_query(family):
    test = {line.split()[0] for line in gzip.decompress((SPLITS / f"coco_{family}_test.txt.gz").read_bytes())
            .decode().splitlines()}
    train = {line.split()[0] for line in gzip.decompress((SPLITS / f"coco_{family}_train.txt.gz").read_bytes())
             .decode().splitlines()}
    assert len(test) == 5000 and len(train) == 10000 and not test & train


def test_the_two_families_are_different_draws_with_the_same_labels():
    hashnet, deephash = shipped_coco_rows("hashnet"), shipped_coco_rows("deephash")
    shared = set(hashnet) & set(deephash)
    assert 0 < len(shared) < 5000  # a different draw, but one labelling of COCO
    assert all(hashnet[name] == deephash[name] for name in shared)
    person = coco.CLASS_NAMES.index("person")
    counts = np.array([row.split() for row in {**hashnet, **deephash}.values()], dtype=int).sum(axis=0)
    assert counts.argmax() == person == 49  # columns in alphabetical order of the names, not COCO's id order


def test_image_key_reads_the_path_forms_of_both_families():
    assert coco_paths.image_key("/home/caozhangjie/run-czj/dataset/coco/val2014/COCO_val2014_000000477705.jpg") \
        == "val2014/COCO_val2014_000000477705.jpg"
    assert coco_paths.image_key("train2014/COCO_train2014_000000566612.jpg") == "train2014/COCO_train2014_000000566612.jpg"
    assert coco_paths.image_key("./data/coco/train2014/COCO_train2014_000000000009.jpg").startswith("train2014/")
    assert coco_paths.image_key("images/0001.jpg") is None


def labelled(names):
    return LabelledPaths(list(names), np.eye(len(names), 3, dtype=np.float32), "labels.txt")


def test_rebuilt_database_is_the_labelled_images_minus_the_queries_and_is_checked():
    every = labelled("abcdef")
    query, train = labelled("ae"), labelled("bc")
    database = coco.rebuilt_database(every, query, train, size=4)
    assert database.paths == ["b", "c", "d", "f"]
    assert np.array_equal(database.labels, every.labels[[1, 2, 3, 5]])
    with pytest.raises(UserError, match=r"leaves 4 images, not the 117,218 of the COCO protocol"):
        coco.rebuilt_database(every, query, train, size=117218)
    with pytest.raises(UserError, match=r"^1 training image is not in the database rebuilt from labels\.txt \(e\.g\. x\)"):
        coco.rebuilt_database(every, query, labelled("bx"), size=4)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """DATA_ROOT with coco/ in the real layout: every image of both families plus two more, and labels.txt."""
    rows = {**shipped_coco_rows("hashnet", "deephash"), **EXTRA_IMAGES}
    root = tmp_path_factory.mktemp("coco_root")
    write_coco_tree(root, rows)
    return root, rows


@pytest.fixture()
def fixture_database_size(coco_root, monkeypatch):
    """The fixture's labelled images minus 5,000 queries stand in for COCO's 117,218."""
    monkeypatch.setattr(coco, "DATABASE_SIZE", len(coco_root[1]) - 5000)


@pytest.mark.parametrize("family", ["hashnet", "deephash"])
def test_each_variant_reads_the_real_layout(coco_root, fixture_database_size, family):
    root, rows = coco_root
    splits = coco.list_splits(root, options=DataOptions(split_variant=family))
    sizes = {name: len(split.paths) for name, split in splits.items()}
    assert sizes == {"train": 10000, "query": 5000, "database": len(rows) - 5000}
    query, database = set(splits["query"].paths), set(splits["database"].paths)
    assert not query & database and set(splits["train"].paths) <= database
    assert str(root / "coco" / next(iter(EXTRA_IMAGES))) in database
    for split in splits.values():  # every row carries the labels the fixture wrote for that image
        for index in (0, len(split.paths) - 1):
            name = split.paths[index][len(str(root / "coco")) + 1:]
            assert " ".join(str(int(v)) for v in split.labels[index]) == rows[name]


def test_the_database_count_is_checked_on_the_real_layout(coco_root):
    with pytest.raises(UserError, match=r"leaves 23,221 images, not the 117,218 of the COCO protocol"):
        coco.list_splits(coco_root[0], options=DataOptions(split_variant="hashnet"))


def test_a_missing_labels_file_names_the_builder(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(UserError, match=r"no .*coco/labels\.txt: .*python -m data\.coco_lists --annotations DIR"):
        coco.list_splits(tmp_path, options=DataOptions(split_variant="deephash"))


@pytest.mark.parametrize("family", ["hashnet", "deephash"])
def test_a_tiny_training_runs_on_each_variant(coco_root, fixture_database_size, tmp_path, family, capsys):
    args = ["--dataset", "coco", "--split_variant", family, "--data_root", str(coco_root[0]), "--subset", "12",
            "--backbone", "small", "--hash_bit", "16", "--batch_size", "6", "--epochs", "1", "--eval_every", "1",
            "--device", "cpu", "--workers", "0", "--output_dir", str(tmp_path / "out")]
    result = retrieval.main(retrieval.get_args_parser().parse_args(args))
    out = capsys.readouterr().out
    assert "{'train': 12, 'query': 12, 'database': 12}" in out
    assert f"data files: split_variant {family} (" in out
    assert 0 <= result["map"] <= 1
    logs = list((tmp_path / "out").rglob("*.jsonl")) + list((tmp_path / "out").rglob("*.log"))
    assert any(f'"split_variant": "{family} (' in log.read_text() for log in logs)
    metrics_file = next((tmp_path / "out").rglob("*.metrics.json"))
    assert metrics_file.name == f"coco_{family}_small_16.metrics.json"  # the families never share a run's files
    metrics = json.loads(metrics_file.read_text())
    assert metrics["run"]["data_files"]["split_variant"].startswith(f"{family} ({coco.VARIANTS[family][0]}:")


GOOD_LABELS = [1] + [0] * 79


def test_own_lists_are_used_when_the_folder_holds_all_three(tmp_path):
    write_list_folder(tmp_path / "coco", {"train.txt": [("img/a.png", GOOD_LABELS)],
                                          "test.txt": [("img/b.png", GOOD_LABELS)],
                                          "database.txt": [("img/a.png", GOOD_LABELS), ("img/c.png", GOOD_LABELS)]})
    splits = get_dataset_spec("coco").build(tmp_path, seed=0, preprocessing=24)
    assert [len(part) for part in splits] == [1, 1, 2]
    assert coco.describe(tmp_path)["split_variant"].startswith("own")
    with pytest.raises(UserError, match="no .*coco/labels.txt"):  # a named variant ignores them
        get_dataset_spec("coco").build(tmp_path, seed=0, preprocessing=24, options=DataOptions(split_variant="hashnet"))


def query_in_database_folder(root):
    trained = [("img/t0.png", GOOD_LABELS), ("img/t1.png", GOOD_LABELS)]
    rows = {"train.txt": trained, "test.txt": [(f"img/q{index}.png", GOOD_LABELS) for index in range(5)],
            "database.txt": [(f"img/q{index}.png", GOOD_LABELS) for index in range(4)] + trained}
    return write_list_folder(Path(root) / "coco", rows)


def test_a_database_holding_queries_is_refused_unless_allowed(tmp_path):
    query_in_database_folder(tmp_path)
    with pytest.raises(UserError, match=r"^4 query images are also in the database \(e\.g\. .*q0\.png, .*q1\.png, "
                                        r".*q2\.png and 1 more\): .*--allow_query_in_database"):
        get_dataset_spec("coco").build(tmp_path, seed=0, preprocessing=24)
    splits = get_dataset_spec("coco").build(tmp_path, seed=0, preprocessing=24,
                                            options=DataOptions(allow_query_in_database=True))
    assert len(splits.database) == 6


def test_the_query_in_database_refusal_is_one_line_and_the_flag_overrides_it(tmp_path, capsys):
    query_in_database_folder(tmp_path)
    args = ["--dataset", "coco", "--data_root", str(tmp_path), "--backbone", "small", "--hash_bit", "16",
            "--batch_size", "4", "--epochs", "1", "--device", "cpu", "--workers", "0", "--no_save"]
    code, _, err = exit_status(retrieval.cli, args, capsys)
    assert code != 0 and err.strip().splitlines()[-1].startswith("error: 4 query images are also in the database")
    code, out, _ = exit_status(retrieval.cli, args + ["--allow_query_in_database"], capsys)
    assert code == 0 and "'database': 6" in out


def test_split_variant_is_refused_for_another_dataset(capsys):
    code, _, err = exit_status(retrieval.cli, ["--dataset", "digits", "--split_variant", "hashnet"], capsys)
    assert code != 0 and "--split_variant applies to --dataset coco only" in err


def test_the_shipped_coco_hierarchy_follows_the_lists_column_order():
    from data.hierarchy_files import read_hierarchy
    hierarchy = read_hierarchy("coco", 80, coco.CLASS_NAMES)  # refused if a row named another class
    groups = hierarchy.level_names[0]
    assert groups[hierarchy.levels[0][coco.CLASS_NAMES.index("person")]] == "person"
    assert groups[hierarchy.levels[0][coco.CLASS_NAMES.index("zebra")]] == "animal"
