"""benchmarks/compare.py: a 2 x 2 grid end to end on a tiny digits subset, then resuming it."""
import csv
from argparse import Namespace
from pathlib import Path

import pytest

import retrieval
from utils.errors import UserError
from tests.cli_runs import load_script
from utils.runlog import read_run_log

ROOT = Path(__file__).resolve().parents[1]


compare = load_script("benchmarks/compare.py")


def grid(out, *more):
    return ["--losses", "hyp2", "dpsh", "--bits", "8", "16", "--seeds", "0", "--epochs", "1", "--subset", "40",
            "--device", "cpu", "--output_dir", str(out), *more, "--", "--batch_size", "20"]


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, compare.main(grid(out))


def test_grid_runs_every_cell_and_writes_the_tables(finished_grid, capsys):
    out, summary = finished_grid
    assert summary["trained"] == 4 and summary["reused"] == 0 and not summary["failed"]
    cells = sorted(path.name for path in (out / "compare_digits_small").iterdir())
    assert cells == ["dpsh_16bit_seed0", "dpsh_8bit_seed0", "hyp2_16bit_seed0", "hyp2_8bit_seed0"]
    assert (out / "compare_digits_small" / "dpsh_8bit_seed0" / "digits_small_8_dpsh.jsonl").exists()

    with open(out / "compare_digits_small.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["loss"], row["hash_bit"], row["runs"]) for row in rows] == [
        ("hyp2", "8", "1"), ("hyp2", "16", "1"), ("dpsh", "8", "1"), ("dpsh", "16", "1")]
    record = read_run_log(out / "compare_digits_small" / "hyp2_16bit_seed0" / "digits_small_16.jsonl")
    assert float(rows[1]["map_mean"]) == pytest.approx(record["best"]["map"])
    assert float(rows[1]["train_seconds_mean"]) == pytest.approx(record["train_seconds"])
    assert rows[1]["map_std"] == "" and rows[1]["paper_map"] == ""  # one seed; digits is not in the paper
    assert {row["select"] for row in rows} == {"test"}

    table = (out / "compare_digits_small.md").read_text()
    assert "| loss | 8 bits | 16 bits |" in table
    assert "| hyp2 | " in table and "| dpsh | " in table and "4 of 4 runs finished" in table
    assert "mAP@40 (after the last epoch)" in table  # one evaluation, after the last epoch: nothing is selected
    assert f"{record['best']['map']:.4f}" in table


def test_second_invocation_reuses_finished_cells(finished_grid, monkeypatch):
    out, first = finished_grid

    def must_not_train(args):
        raise AssertionError(f"retrained {args.loss} {args.hash_bit}")

    monkeypatch.setattr(retrieval, "main", must_not_train)
    summary = compare.main(grid(out))
    assert summary["trained"] == 0 and summary["reused"] == 4
    assert [row["map_mean"] for row in summary["rows"]] == [row["map_mean"] for row in first["rows"]]


def test_an_unfinished_cell_is_trained_again(finished_grid, tmp_path):
    out, _ = finished_grid
    resumed = tmp_path / "grid"
    (resumed / "compare_digits_small").mkdir(parents=True)
    for cell in (out / "compare_digits_small").iterdir():
        copy = resumed / "compare_digits_small" / cell.name
        copy.mkdir()
        for path in cell.iterdir():
            (copy / path.name).write_bytes(path.read_bytes())
    interrupted = resumed / "compare_digits_small" / "dpsh_8bit_seed0" / "digits_small_8_dpsh.jsonl"
    lines = interrupted.read_text().splitlines()
    assert '"event": "finish"' in lines[-1]
    interrupted.write_text("\n".join(lines[:-1]) + "\n")  # killed before it finished
    summary = compare.main(grid(resumed))
    assert summary["trained"] == 1 and summary["reused"] == 3


def test_a_cell_finished_with_other_settings_is_not_reused(finished_grid):
    out, _ = finished_grid
    options = compare.get_args_parser().parse_args(grid(out)[:-3])
    same = compare.cell_args(options, "hyp2", 8, 0, ["--batch_size", "20"])
    assert compare.finished_record(same) is not None
    assert compare.finished_record(compare.cell_args(options, "hyp2", 8, 0, ["--batch_size", "10"])) is None
    options.epochs = 2
    assert compare.finished_record(compare.cell_args(options, "hyp2", 8, 0, ["--batch_size", "20"])) is None


def test_flags_the_grid_owns_are_refused(tmp_path):
    options = compare.get_args_parser().parse_args(["--output_dir", str(tmp_path)])
    for extra in (["--loss", "dch"], ["--no_save"], ["--seed", "3"], ["--output_dir", str(tmp_path / "other")]):
        with pytest.raises(UserError, match="may not"):
            compare.cell_args(options, "hyp2", 12, 0, extra)
    for extra in (["--loss", "dch"], ["--no_save"], ["--seed", "3"]):
        with pytest.raises(UserError, match=f"may not be given {extra[0]}"):
            compare.main(["--output_dir", str(tmp_path), *extra])
    assert list(tmp_path.iterdir()) == []


def test_retrieval_flags_reach_every_cell(tmp_path):
    options = compare.get_args_parser().parse_args(["--output_dir", str(tmp_path), "--lr", "0.01", "--batch_size", "7"])
    args = compare.cell_args(options, "dpsh", 24, 1)
    assert (args.lr, args.batch_size, args.loss, args.hash_bit, args.seed) == (0.01, 7, "dpsh", 24, 1)
    assert (args.dataset, args.backbone, args.epochs) == ("digits", "small", 10)  # the grid's defaults


def test_per_loss_flags_reach_only_their_loss(tmp_path):
    options = compare.get_args_parser().parse_args(
        ["--losses", "hyp2", "proxy_anchor", "--loss_args", "proxy_anchor=--lr 0.005 --rate 0.01"])
    assert options.loss_args == [("proxy_anchor", ["--lr", "0.005", "--rate", "0.01"])]
    assert "Per-loss flags: proxy_anchor `--lr 0.005 --rate 0.01`." in compare.render_markdown(
        Namespace(**{**vars(options), "dataset": "digits"}), [], [], "cmd")
    with pytest.raises(UserError, match="--loss_args names dch"):
        compare.main(["--losses", "hyp2", "--loss_args", "dch=--lr 1", "--output_dir", str(tmp_path)])


def test_variants_name_hierarchical_proxies():
    assert compare.split_variant("proxy_anchor_hpl4") == ("proxy_anchor", 4)
    assert compare.split_variant("proxy_anchor") == ("proxy_anchor", 0)
    parser = compare.get_args_parser()
    assert parser.parse_args(["--losses", "hhf_hpl3"]).losses == ["hhf_hpl3"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--losses", "dpsh_hpl3"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--losses", "triplet"])


def test_paper_figures_stand_next_to_ours():
    options = Namespace(dataset="flickr", backbone="alexnet", bits=[12, 48, 64], seeds=[0, 1], epochs=100,
                        eval_every=5, subset=0, loss_args=[])
    rows = [{"loss": "hyp2", "hash_bit": bits, "runs": 2, "map_mean": value, "map_std": 0.01, "topk": 1000,
             "train_seconds_mean": 60.0, "paper_map": compare.paper_map("flickr", "hyp2", bits)}
            for bits, value in [(12, .8), (48, .9), (64, .95)]]
    table = compare.render_markdown(options, ["hyp2"], rows, "cmd")
    assert "**0.8000 ± 0.0100** (paper 0.845)" in table and "**0.9000 ± 0.0100** (paper 0.901)" in table
    assert "**0.9500 ± 0.0100** |" in table  # the paper has no 64-bit Flickr figure
    assert "HyP² paper, alexnet, mAP@1000" in table and "reference, not a target" not in table
    assert compare.paper_map("voc2007", "orthohash", 32) == .876 and compare.paper_map("voc2007", "csq", 32) is None
    assert "paper_map" in compare.render_csv(rows).splitlines()[0] and ",0.901\n" in compare.render_csv(rows)


def test_the_tables_name_the_data_files_the_runs_recorded():
    options = Namespace(dataset="coco", backbone="small", bits=[16, 32], seeds=[0], epochs=1, eval_every=1,
                        subset=0, loss_args=[])
    hashnet = {"data_files": {"split_variant": "hashnet (COCO, HashNet lists)"}}
    assert compare.data_files_text([hashnet, hashnet, {}]) == "split_variant hashnet (COCO, HashNet lists)"
    rows = [{"loss": "hyp2", "hash_bit": bits, "runs": 1, "map_mean": 0.5, "map_std": None, "topk": 5000,
             "train_seconds_mean": 1.0, "paper_map": None, "data_files": compare.data_files_text([hashnet])}
            for bits in (16, 32)]
    table = compare.render_markdown(options, ["hyp2"], rows, "cmd")
    assert "Data files (from the run logs): split_variant hashnet (COCO, HashNet lists)." in table
    rows[1]["data_files"] = "split_variant deephash (COCO, DeepHash-pytorch lists)"
    table = compare.render_markdown(options, ["hyp2"], rows, "cmd")
    assert ("Data files differ between cells: hyp2 16 bits: split_variant hashnet (COCO, HashNet lists); hyp2 32 "
            "bits: split_variant deephash (COCO, DeepHash-pytorch lists).") in table
    assert ',"split_variant hashnet (COCO, HashNet lists)",5000,' in compare.render_csv(rows)
