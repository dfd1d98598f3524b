"""Issue 30, the harnesses and the docs: a long-tail study continued with more epochs, `reproduce` without the
data, `digits_study --collect` with nothing run, `bench_search` without --methods, and the pair losses' memory of
the training set's codes (DeepHash-pytorch's DPSH and DHN)."""
import json
import re
import shlex
import urllib.error
from pathlib import Path

import pytest

import retrieval
from benchmarks import digits_study, longtail_study, reproduce
from data import archives, voc
from session.files import RunFiles
from tests.cli_runs import exit_status

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


# ============ 10b: the long-tail study continued with other --epochs ============

def finish_like_a_run(args):
    """What a finished retrieval.py run leaves that the study reads: its event log (the start event records the
    args as the run saw them, `resume` included) and its metrics."""
    files = RunFiles.for_args(args)
    files.event_log.parent.mkdir(parents=True, exist_ok=True)
    events = [{"event": "start", "args": vars(args)},
              {"event": "epoch", "epoch": args.epochs, "map": 0.5, "train_seconds": 1.0},
              {"event": "best", "map": 0.5, "epoch": args.epochs},
              {"event": "finish", "test_map": 0.5}]
    files.event_log.write_text("".join(json.dumps(event) + "\n" for event in events))
    files.metrics.write_text(json.dumps({"map": 0.5, "long_tail": {"buckets": {"tail": {"map": 0.25}}}}))


def test_a_long_tail_cell_resumed_with_more_epochs_counts_as_done(tmp_path, monkeypatch, capsys):
    options = longtail_study.get_args_parser().parse_args(["--studies", "hpl", "--seeds", "0", "--epochs", "2",
                                                           "--output_dir", str(tmp_path)])
    first = longtail_study.cell_args(options, "hpl", "HyP² (no hierarchy)", 1.0, 0)
    state = RunFiles.for_args(first).last
    state.parent.mkdir(parents=True)
    state.write_bytes(b"state")  # the training state an earlier `--epochs 1` study left
    monkeypatch.setattr(retrieval, "main", finish_like_a_run)
    assert longtail_study.main(["--studies", "hpl", "--seeds", "0", "--epochs", "2", "--output_dir",
                                str(tmp_path)]) == []
    out = capsys.readouterr().out
    assert out.count("mAP 0.5000, tail 0.2500") == 4 and "4/4 cells done" in out
    assert "| HyP² (no hierarchy) | 0.5000 | 0.2500 | 1 |" in (tmp_path / "longtail_study.md").read_text()


# ============ 11: digits_study --collect before the search has run ============

def test_digits_study_collect_with_nothing_run_says_no_recipe_was_chosen(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(retrieval, "main", lambda args: pytest.fail("trained under --collect"))
    result = digits_study.main(["--losses", "hyp2", "dpsh", "--bits", "8", "--seeds", "0", "--collect",
                                "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "search: hyp2 not chosen yet (0/3 search runs finished), dpsh not chosen yet (0/3 search runs " \
           "finished)" in err
    table = (tmp_path / "digits_study.md").read_text()
    assert "| hyp2 (not chosen yet: 0/3 search runs) | — |" in table and "(`sgd_0.05`)" not in table
    assert [row["recipe"] for row in result["rows"]] == ["", ""]


def test_digits_study_names_a_recipe_only_once_its_search_is_complete():
    scores = {"hyp2": {"sgd_0.05": 0.5, "sgd_0.01": 0.7}, "dpsh": {"sgd_0.05": 0.5, "sgd_0.01": 0.7,
                                                                  "rmsprop_1e-3": 0.6}}
    assert digits_study.chosen_recipe(scores, "hyp2") is None
    assert digits_study.describe_choice(scores, "hyp2") == "not chosen yet (2/3 search runs finished)"
    assert digits_study.chosen_recipe(scores, "dpsh") == "sgd_0.01"
    assert digits_study.describe_choice(scores, "dpsh") == "sgd_0.01"


# ============ 11: reproduce fetches what a run fetches, and says when a cell cannot run ============

def test_reproduce_downloads_the_voc_archives_and_exits_non_zero_with_one_line_when_it_cannot(tmp_path, capsys,
                                                                                            monkeypatch):
    asked = []

    def offline(url, path):
        asked.append(url)
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(archives, "download", offline)
    monkeypatch.setattr(retrieval, "main", lambda args: pytest.fail("trained without data"))
    code, out, err = exit_status(reproduce.cli, ["--table", "voc", "--bits", "16", "--losses", "hyp2",
                                                 "--data_root", str(tmp_path / "data"), "--output_dir",
                                                 str(tmp_path / "out")], capsys)
    # the first archive of each year, as retrieval.py's ensure_extracted asks for them: once per dataset
    assert asked == [voc.ARCHIVES["2007"][0].url, voc.ARCHIVES["2012"][0].url]
    assert code == 1 and "0/2 cells done" in out
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: 2 of 2 cells did not run for want of data: voc2007: "
                                                   "cannot download http://")
    assert "VOCtrainval_11-May-2012.tar" in lines[0]


def test_reproduce_asks_for_the_nuswide_database_not_the_shipped_lists(tmp_path, capsys):
    (tmp_path / "nus_wide").mkdir()
    problem = reproduce.data_problem("nuswide", str(tmp_path))
    assert "database.txt" in problem and "train.txt" not in problem.split("(")[0]
    (tmp_path / "nus_wide" / "database.txt").write_text("")
    assert reproduce.data_problem("nuswide", str(tmp_path)) is None


def dry_run_output(capsys, *argv):
    reproduce.main(["--dry_run", *argv])
    return capsys.readouterr()


def test_the_dry_run_prints_the_total_the_readme_quotes_and_the_readmes_sample_line(capsys):
    captured = dry_run_output(capsys, "--table", "voc")
    commands = captured.out.splitlines()
    per_run = {dataset: max(reproduce.estimate_seconds(dataset)) for dataset in ("voc2007", "voc2012")}
    hours = sum(per_run[shlex.split(line)[3]] for line in commands) / 3600
    total = re.search(r"# total: 40 runs per seed, ~([0-9.]+) GPU-hours", captured.err)
    assert total and float(total.group(1)) == pytest.approx(hours, abs=0.05)
    quoted = re.search(r"the VOC table \(both years\) is ~([0-9.]+)\s+GPU-hours per seed", README)
    assert quoted and float(quoted.group(1)) == pytest.approx(hours, abs=0.05)
    sample = README.split("`--dry_run` prints one command per run")[1].split("```")[1].strip()
    assert sample == commands[0]
