"""Retrieval of unseen classes (--unseen_classes, docs/METHOD.md §13): the split, the three relevance
definitions against a brute-force loop, the losses on the seen classes only, and the reports."""
import json

import numpy as np
import pytest
import torch

import retrieval
from data import ArrayImageDataset, RetrievalSplits, get_dataset_spec
from data.base import split_labels
from data.registry import build_splits
from data.transforms import Preprocessing
from data.unseen import ClassSplit, apply_class_split, resolve_unseen_classes
from hashing.codes import CodeSet
from hashing.evaluation.class_split import class_split_maps
from loss import LOSSES
from session.parts import build_criterion, given_hierarchy
from utils.errors import UserError
from utils.runlog import read_run_log

from cli_runs import load_script, run_small_digits, small_digits_failure

DIGIT_NAMES = tuple(str(digit) for digit in range(10))


@pytest.fixture(scope="module")
def digits_splits():
    return build_splits("digits", ".", 0, Preprocessing(32), subset=300)


def test_the_same_seed_draws_the_same_classes_and_seeds_differ():
    drawn = {seed: resolve_unseen_classes(["0.3"], 10, DIGIT_NAMES, seed) for seed in range(6)}
    assert resolve_unseen_classes("0.3", 10, DIGIT_NAMES, 2) == drawn[2]
    assert all(len(split.unseen) == 3 and len(split.seen) == 7 for split in drawn.values())
    assert len({split.unseen for split in drawn.values()}) > 1
    assert all(sorted(split.seen + split.unseen) == list(range(10)) for split in drawn.values())


def test_names_and_indices_comma_or_space_separated():
    split = resolve_unseen_classes(["b,3", "c"], 5, ("a", "b", "c", "d", "e"))
    assert split == ClassSplit((0, 4), (1, 2, 3))
    assert resolve_unseen_classes(["Ankle boot", "0"], 3, ("T-shirt/top", "Bag", "Ankle boot")).unseen == (0, 2)


def test_no_training_item_holds_an_unseen_class_and_every_unseen_class_can_be_scored(digits_splits):
    class_split = resolve_unseen_classes("0.3", 10, DIGIT_NAMES, seed=0)
    splits = apply_class_split(digits_splits, class_split)
    full = split_labels(splits.train)  # the kept items' labels as the data holds them
    assert not full[:, list(class_split.unseen)].any()
    assert full[:, list(class_split.seen)].any(dim=1).all()
    original = split_labels(digits_splits.train)
    expected = [i for i in range(len(original)) if original[i, list(class_split.unseen)].sum() == 0
                and original[i].sum() > 0]
    assert len(splits.train) == len(expected)
    images, labels = zip(*(splits.train[i] for i in range(len(splits.train))))
    assert torch.equal(torch.stack(labels), full[:, list(class_split.seen)])  # what the loss gets
    assert torch.equal(splits.train[0][0], digits_splits.train[expected[0]][0])
    assert splits.query is digits_splits.query and splits.database is digits_splits.database
    for part in (splits.query, splits.database):
        assert (split_labels(part)[:, list(class_split.unseen)] > 0).any(dim=0).all()


def tiny_splits(query_labels, database_labels, train_labels):
    def part(labels):
        labels = np.array(labels, dtype=np.float32)
        return ArrayImageDataset(np.zeros((len(labels), 3, 2, 2), np.uint8), labels, lambda batch: batch.float())
    return RetrievalSplits(part(train_labels), part(query_labels), part(database_labels))


def test_an_unseen_class_without_queries_or_no_training_item_is_refused():
    splits = tiny_splits([[1, 0, 0], [0, 1, 0]], [[1, 0, 0], [0, 0, 1]], [[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    with pytest.raises(UserError, match="--unseen_classes: unseen class c has no query item"):
        apply_class_split(splits, ClassSplit((0, 1), (2,)), ("a", "b", "c"))
    splits = tiny_splits([[1, 0, 0], [0, 1, 0]], [[1, 0, 0], [0, 1, 1]], [[1, 0, 0], [0, 1, 0], [1, 1, 1]])
    with pytest.raises(UserError, match="0 training item.*hold out fewer classes"):
        apply_class_split(splits, ClassSplit((2,), (0, 1)))


def brute_force_map(query_codes, query_labels, database_codes, database_labels, classes, topk):
    """AP@K by a plain loop (docs/METHOD.md §3.3, hits normalisation, no hit counts 0), over the queries holding
    one of `classes`, relevance = a shared label among `classes`."""
    aps = []
    for code, labels in zip(query_codes, query_labels):
        if not any(labels[c] for c in classes):
            continue
        distances = [sum(a != b for a, b in zip(code, other)) for other in database_codes]
        order = sorted(range(len(database_codes)), key=lambda index: (distances[index], index))[:topk]
        hits, total = 0, 0.0
        for rank, index in enumerate(order, start=1):
            if any(labels[c] and database_labels[index][c] for c in classes):
                hits += 1
                total += hits / rank
        aps.append(total / hits if hits else 0.0)
    return sum(aps) / len(aps)


def test_three_relevance_definitions_against_a_brute_force_loop():
    # classes 0, 1 seen; 2, 3 unseen. Query 2 holds no seen class, query 3 no unseen one.
    query_codes = [[1, 1, 1, 1], [1, -1, 1, -1], [-1, -1, 1, 1], [1, 1, -1, -1]]
    query_labels = [[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]]
    database_codes = [[1, 1, 1, -1], [-1, -1, -1, -1], [1, -1, 1, 1], [-1, 1, 1, 1], [1, 1, -1, 1],
                      [-1, -1, 1, -1]]
    database_labels = [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 1], [1, 0, 1, 0], [0, 1, 1, 0]]
    codes = CodeSet.from_outputs(np.array(query_codes, float), np.array(query_labels),
                                 np.array(database_codes, float), np.array(database_labels))
    class_split = ClassSplit((0, 1), (2, 3))
    for topk in (3, 6):
        maps = class_split_maps(codes, class_split, topk)
        for name, classes, queries in (("seen", (0, 1), 3), ("unseen", (2, 3), 3), ("all", (0, 1, 2, 3), 4)):
            expected = brute_force_map(query_codes, query_labels, database_codes, database_labels, classes, topk)
            assert maps[name]["map"] == pytest.approx(expected), (name, topk)
            assert maps[name]["queries"] == queries
    # the definitions differ on this case, so a swapped column set would fail
    assert len({round(maps[name]["map"], 6) for name in maps}) == 3


@pytest.mark.parametrize("loss, extra", [*((name, []) for name in LOSSES), ("hyp2", ["--hierarchy", "2"]),
                                         ("proxy_anchor", ["--experts", "2"])])
def test_every_loss_trains_on_the_seen_classes_only(loss, extra):
    args = retrieval.get_args_parser().parse_args(["--dataset", "digits", "--hash_bit", "16", "--loss", loss, *extra])
    seen = (0, 2, 5, 7)
    criterion = build_criterion(args, get_dataset_spec("digits"), seen)
    uses_indices = getattr(criterion, "uses_item_indices", False)
    if uses_indices:
        criterion.attach_training_set(8)
    labels = torch.zeros(8, len(seen))
    labels[torch.arange(8), torch.arange(8) % len(seen)] = 1
    codes = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    outputs = torch.stack([codes, codes.flip(0)], dim=1) if "--experts" in extra else codes
    value = criterion(outputs, labels, torch.arange(8)) if uses_indices else criterion(outputs, labels)
    value.backward()
    assert torch.isfinite(value) and codes.grad.abs().sum() > 0
    class_state = [name for name, tensor in [*criterion.named_parameters(), *criterion.named_buffers()]
                   if len(seen) in tensor.shape[:1]]
    if loss in ("hyp2", "proxy_anchor", "hhf", "csq", "orthohash"):  # one proxy / centre per seen class
        assert class_state, [name for name, _ in criterion.named_parameters()]


def test_a_hierarchy_file_is_cut_to_the_seen_classes():
    args = retrieval.get_args_parser().parse_args(["--dataset", "digits", "--hierarchy_file", "digits"])
    full = given_hierarchy(args, get_dataset_spec("digits"))
    seen = (0, 3, 4, 8, 9)
    cut = given_hierarchy(args, get_dataset_spec("digits"), seen)
    for full_level, cut_level in zip(full, cut):
        assert len(cut_level) == len(seen)
        for i in range(len(seen)):
            for j in range(len(seen)):
                assert (cut_level[i] == cut_level[j]) == (full_level[seen[i]] == full_level[seen[j]])


def test_a_run_reports_the_three_figures_everywhere_and_test_reads_the_classes_back(tmp_path, capsys):
    out = str(tmp_path)
    summary = run_small_digits(["--epochs", "1", "--unseen_classes", "0.3", "--output_dir", out, "--no_progress"])
    maps = summary["class_split_map"]
    assert set(maps) == {"seen", "unseen", "all"} and all(0 <= maps[name]["map"] <= 1 for name in maps)
    assert maps["seen"]["map"] == pytest.approx(summary["map"])  # the checkpoint is selected by the seen classes
    printed = capsys.readouterr().out
    assert f"unseen classes {maps['unseen']['map']:.4f}" in printed.splitlines()[-1]
    metrics = json.loads(next(tmp_path.glob("*.metrics.json")).read_text())
    assert metrics["class_split"]["map"] == maps
    assert metrics["class_split"]["unseen"] == list(resolve_unseen_classes("0.3", 10, DIGIT_NAMES, 0).unseen)
    log = read_run_log(next(tmp_path.glob("*.jsonl")))
    assert log["class_split_map"] == maps and log["class_split"]["unseen"] == metrics["class_split"]["unseen"]
    tested = run_small_digits(["--test", "--output_dir", out, "--no_progress"])
    assert tested["metrics"]["class_split"]["map"] == maps  # the classes read back from the run log


def test_no_save_still_reports_the_three_figures(tmp_path):
    summary = run_small_digits(["--epochs", "1", "--unseen_classes", "2", "5", "--no_save", "--output_dir",
                                str(tmp_path), "--no_progress"])
    assert summary["class_split_map"]["unseen"]["queries"] > 0


def test_no_save_reports_the_figures_of_a_saved_run(tmp_path):
    """Without a metrics file the finish takes the mAPs training measured; they are those --test's pass computes."""
    flags = ["--epochs", "1", "--unseen_classes", "2", "5", "--nested_bits", "8", "16", "--no_progress"]
    saved = run_small_digits(flags + ["--output_dir", str(tmp_path / "saved")])
    unsaved = run_small_digits(flags + ["--no_save", "--output_dir", str(tmp_path / "unsaved")])
    assert unsaved["class_split_map"] == saved["class_split_map"]
    assert unsaved["map_by_bits"] == saved["map_by_bits"] and list(saved["map_by_bits"]) == ["8", "16"]


@pytest.mark.parametrize("value, message", [
    ("1.5", "--unseen_classes 1.5: a fraction of the classes must lie strictly between 0 and 1"),
    ("0.0", "--unseen_classes 0.0: a fraction"),
    ("seven", "--unseen_classes: no class 'seven' in this dataset"),
    ("10", "--unseen_classes: no class '10' in this dataset"),
    ("0,1,2,3,4,5,6,7,8,9", "--unseen_classes: all 10 classes would be unseen"),
])
def test_bad_values_are_one_line_errors(value, message, capsys, tmp_path):
    code, err = small_digits_failure(["--unseen_classes", value, "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and message in err and err.strip().count("\n") == 0


def test_the_comparison_harness_passes_the_flag_and_tabulates_the_three_figures(tmp_path):
    compare = load_script("benchmarks/compare.py")
    summary = compare.main(["--losses", "hyp2", "--bits", "16", "--seeds", "0", "--epochs", "1", "--subset", "200",
                            "--device", "cpu", "--batch_size", "20", "--unseen_classes", "0.3",
                            "--output_dir", str(tmp_path)])
    row = summary["rows"][0]
    runs = sorted((tmp_path / "compare_digits_small_unseen0.3").glob("*/*.jsonl"))
    logged = [read_run_log(path) for path in runs]
    assert len(logged) == 1 and all(record["args"]["unseen_classes"] == ["0.3"] for record in logged)
    for name in ("seen", "unseen", "all"):
        values = [record["class_split_map"][name]["map"] for record in logged]
        assert row[f"{name}_map_mean"] == pytest.approx(values[0])
    table = (tmp_path / "compare_digits_small_unseen0.3.md").read_text()
    assert "| loss | 16 bits seen | 16 bits unseen | 16 bits all |" in table
    assert (tmp_path / "compare_digits_small_unseen0.3.csv").read_text().splitlines()[0].endswith("all_map_std")
    assert f"| hyp2 | {row['seen_map_mean']:.4f} | {row['unseen_map_mean']:.4f} | {row['all_map_mean']:.4f} |" in table
