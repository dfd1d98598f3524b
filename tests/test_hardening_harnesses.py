"""Issue 23, the harnesses and the plumbing under them: seeds that are one run each, logs that are checked before
they count, Ctrl-C that stops a grid, a missing dataset found once, the thread count with every table, a line per
finished run, the long-tail study resuming its cells; a full disk under the run lock and the logs, and one error
line under torchrun."""
import csv
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import retrieval
from benchmarks import compare, digits_study, longtail_study, reproduce
from session.files import RunFiles
from tests.cli_runs import exit_status
from utils.errors import TrainingInterrupted, UserError
from utils.lock import run_lock
from utils.runlog import RunLog

ROOT = Path(__file__).resolve().parents[1]
THREADS = torch.get_num_threads()


def reproduce_grid(tmp_path, *more):
    return ["--table", "voc", "--bits", "16", "--losses", "hyp2", "--data_root", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), *more]


def compare_grid(tmp_path, *more):
    return ["--losses", "hyp2", "dpsh", "--bits", "8", "--seeds", "0", "--epochs", "1", "--subset", "40",
            "--device", "cpu", "--output_dir", str(tmp_path / "out"), *more]


def must_not_train(args):
    raise AssertionError(f"trained {args.loss} {args.hash_bit} seed {args.seed}")


# ============ seeds: each one run, each one that retrieval.py takes ============

@pytest.mark.parametrize("harness, argv", [
    (reproduce.main, ["--table", "voc", "--dry_run", "--seeds", "0", "0", "0"]),
    (compare.main, ["--seeds", "1", "0", "1"]),
    (longtail_study.main, ["--seeds", "2", "2", "--table_only"]),
    (digits_study.main, ["--seeds", "0", "0", "--collect"]),
])
def test_a_seed_listed_twice_is_refused(tmp_path, monkeypatch, harness, argv):
    monkeypatch.setattr(retrieval, "main", must_not_train)
    with pytest.raises(UserError, match="--seeds lists [0-9] more than once: each seed is one run"):
        harness(argv + ["--output_dir", str(tmp_path)])


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32)])
def test_a_seed_that_retrieval_refuses_is_refused_before_any_command_is_printed(tmp_path, capsys, seed):
    code, out, err = exit_status(reproduce.cli, reproduce_grid(tmp_path, "--dry_run", "--seeds", "0", seed), capsys)
    assert code == 2 and "--seeds" in err and "python retrieval.py" not in out


# ============ --collect: a log counts when it is a finished run's ============

def args_of(tmp_path, seed=0, *more):
    options, overrides = reproduce.parse(reproduce_grid(tmp_path, "--collect", *more))
    return retrieval.get_args_parser().parse_args(reproduce.command(options, overrides, ("voc2007", 16, "hyp2"), seed))


def write_events(args, events):
    path = RunFiles.for_args(args).event_log
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(event if isinstance(event, bytes) else (json.dumps(event) + "\n").encode()
                              for event in events))


def finished_events(args, best=0.5):
    return [{"event": "start", "args": vars(args), "topk": 5011},
            {"event": "epoch", "epoch": 1, "map": best, "train_seconds": 1.0},
            {"event": "best", "map": best, "epoch": 1}, {"event": "finish", "test_map": best, "train_seconds": 1.0}]


def collected_status(tmp_path, capsys):
    code, _, err = exit_status(reproduce.cli, reproduce_grid(tmp_path, "--collect"), capsys)
    rows = reproduce.table_rows(*reproduce.parse(reproduce_grid(tmp_path, "--collect")),
                                {"voc2007": None, "voc2012": None}, {})
    return code, err, next(row for row in rows if row["dataset"] == "voc2007")


def test_a_log_of_only_best_and_finish_is_not_a_finished_run(tmp_path, capsys):
    args = args_of(tmp_path)
    write_events(args, finished_events(args)[2:])
    code, err, row = collected_status(tmp_path, capsys)
    assert code == 0 and row["status"].startswith("unusable log") and "no start event" in row["status"]
    assert row["map_mean"] is None


@pytest.mark.parametrize("value", [float("nan"), 1.5, "0.8"])
def test_a_log_whose_map_is_not_a_map_is_not_ok(tmp_path, capsys, value):
    args = args_of(tmp_path)
    events = finished_events(args)
    events[-1]["test_map"] = value
    write_events(args, events)
    code, err, row = collected_status(tmp_path, capsys)
    assert code == 0 and row["status"].startswith("unusable log") and "mAP" in row["status"]
    assert row["map_mean"] is None or math.isfinite(row["map_mean"])


@pytest.mark.parametrize("bad_line", [b"[1, 2]\n", b'{"event": "epoch", "epoch": 2, "map": 0.5}\xff\xfe\n',
                                      b'"a string"\n', b'{"event": "resume", "args": {}}\n',
                                      b'{"event": "epoch", "epoch": "two", "map": "x", "train_seconds": 1}\n',
                                      b'{"event": "best", "map": "0.9"}\n', b'{"event": "start", "args": "text"}\n'])
def test_malformed_log_lines_are_a_status_not_a_traceback(tmp_path, capsys, bad_line):
    args = args_of(tmp_path)
    events = finished_events(args)
    write_events(args, events[:2] + [bad_line] + events[2:])
    code, err, row = collected_status(tmp_path, capsys)
    assert code == 0 and "Traceback" not in err
    assert row["status"] == "ok" or row["status"].startswith("unusable log"), row["status"]


def test_no_data_here_does_not_hide_runs_that_finished_elsewhere(tmp_path, capsys):
    args = args_of(tmp_path)
    write_events(args, finished_events(args, best=0.7))  # no VOC under --data_root: the run was on a cluster
    code, _, row = collected_status(tmp_path, capsys)
    assert code == 0 and row["status"] == "ok" and row["map_mean"] == pytest.approx(0.7)
    rows = reproduce.table_rows(*reproduce.parse(reproduce_grid(tmp_path, "--collect", "--seeds", "0", "1")),
                                {"voc2007": "put VOCdevkit/VOC2007 there", "voc2012": None}, {})
    assert rows[0]["status"] == "no data: put VOCdevkit/VOC2007 there (1/2 seeds done)"


# ============ Ctrl-C stops a grid, naming the cell ============

@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), TrainingInterrupted("interrupted in epoch 1: the "
                                                                                    "state is in x.last.pt")])
def test_ctrl_c_stops_compare_naming_the_cell(tmp_path, capsys, monkeypatch, interruption):
    calls = []

    def interrupted(args):
        calls.append(args.loss)
        raise interruption

    monkeypatch.setattr(retrieval, "main", interrupted)
    code, _, err = exit_status(compare.cli, compare_grid(tmp_path), capsys)
    assert code == 130 and calls == ["hyp2"]  # the grid did not go on to dpsh
    assert "error: the cell hyp2 8 bits seed 0" in err and "was interrupted" in err and err.count("error: ") == 1


def test_ctrl_c_stops_the_long_tail_study_naming_the_cell(tmp_path, capsys, monkeypatch):
    calls = []

    def interrupted(args):
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(retrieval, "main", interrupted)
    with pytest.raises(TrainingInterrupted, match="the cell hyp2 48 bits seed 0 .* was interrupted"):
        longtail_study.main(["--studies", "hpl", "--seeds", "0", "--output_dir", str(tmp_path)])
    assert len(calls) == 1


# ============ the long-tail study continues its cells ============

def test_the_long_tail_study_resumes_an_interrupted_cell_and_replaces_an_other_settings_run(tmp_path, monkeypatch):
    options = longtail_study.get_args_parser().parse_args(["--studies", "hpl", "--seeds", "0", "--output_dir",
                                                           str(tmp_path)])
    first = longtail_study.cell_args(options, "hpl", "HyP² (no hierarchy)", 1.0, 0)
    state = RunFiles.for_args(first).last
    state.parent.mkdir(parents=True)
    state.write_bytes(b"state")  # an interrupted (or earlier, other --epochs) run of the first cell
    seen = {}

    def record(args):
        seen[args.output_dir] = args
        raise UserError("stopped here")

    monkeypatch.setattr(retrieval, "main", record)
    longtail_study.main(["--studies", "hpl", "--seeds", "0", "--output_dir", str(tmp_path)])
    assert len(seen) == 4 and seen[first.output_dir].resume == "" and seen[first.output_dir].overwrite
    assert all(args.resume is None and args.overwrite for key, args in seen.items() if key != first.output_dir)


# ============ a missing dataset is found once ============

def test_compare_on_a_missing_dataset_stops_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(retrieval, "main", must_not_train)
    code, _, err = exit_status(compare.cli, compare_grid(tmp_path, "--dataset", "nuswide", "--backbone", "small",
                                                         "--data_root", str(tmp_path / "data")), capsys)
    assert code == 1 and err == (f"error: no folder {tmp_path}/data/nus_wide: it should hold database.txt and the "
                                 "images they list (train.txt and test.txt ship in data/splits/) (see README, "
                                 "Datasets); or pass --data_root\n")


# ============ the thread count goes with every table ============

def test_every_harness_table_records_the_thread_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(retrieval, "main", lambda args: (_ for _ in ()).throw(UserError("no training here")))
    rerun = f"OMP_NUM_THREADS={THREADS} python"
    compare.main(compare_grid(tmp_path))
    reproduce.main(reproduce_grid(tmp_path, "--collect"))
    longtail_study.main(["--studies", "hpl", "--seeds", "0", "--table_only", "--output_dir", str(tmp_path / "out")])
    digits_study.main(["--losses", "hyp2", "--bits", "8", "--seeds", "0", "--collect", "--output_dir",
                       str(tmp_path / "out")])
    out = tmp_path / "out"
    for table in ("compare_digits_small", "reproduce_voc", "longtail_study", "digits_study"):
        text = (out / f"{table}.md").read_text()
        assert f"{THREADS} CPU thread" in text and f"`{rerun} " in text, table
    for table in ("compare_digits_small", "reproduce_voc", "digits_study"):
        with open(out / f"{table}.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and all(row["threads"] == str(THREADS) for row in rows), table


# ============ digits_study says when a run finishes ============

def test_digits_study_prints_a_line_per_finished_run(tmp_path, monkeypatch, capsys):
    finished = {}

    def train(args, verbose):
        finished[args.output_dir] = {"selection": {"val_map": 0.5}, "train_seconds": 1.0,
                                     "epochs": [{"epoch": 1, "map": 0.25, "train_seconds": 1.0}]}

    monkeypatch.setattr(compare, "train_or_resume", train)
    monkeypatch.setattr(compare, "finished_record", lambda args: finished.get(args.output_dir))
    digits_study.main(["--losses", "hyp2", "--bits", "8", "--seeds", "0", "1", "--epochs", "1", "--output_dir",
                       str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 3 + 2  # three search recipes, then two seeds
    assert lines[0].startswith("[1/3] search hyp2 sgd_0.05 24 bits seed 0: val mAP 0.5000")
    assert lines[-1].startswith("[2/2] final hyp2 sgd_0.05 8 bits seed 1: mAP 0.2500")


# ============ a full disk under the run lock and the logs ============

class FullDisk:
    """An open file whose writes fail as on a full disk."""

    def __init__(self, handle):
        self.handle = handle

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_under_the_run_lock_is_one_line(tmp_path, monkeypatch):
    import utils.lock
    monkeypatch.setattr(utils.lock, "open", lambda path, mode: FullDisk(open(path, mode)), raising=False)
    with pytest.raises(UserError, match=f"cannot write the run lock {tmp_path}/run.lock \\(No space left on device\\); "
                                        "free disk space or choose another --output_dir"):
        with run_lock(tmp_path / "run.lock"):
            pytest.fail("ran without its lock")
    assert not (tmp_path / "run.lock").exists()


def test_a_full_disk_under_the_logs_is_one_line(tmp_path):
    files = SimpleNamespace(text_log=tmp_path / "run.txt", event_log=tmp_path / "run.jsonl")
    files.text_log.symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(UserError, match=f"could not write {tmp_path}/run.txt \\(No space left on device\\); free disk "
                                        "space or choose another --output_dir"):
        RunLog(files).say("epoch 1")


# ============ torchrun: one error line ============

def test_under_torchrun_one_process_prints_the_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "retrieval.py",
         "--dataset", "list", "--data_root", str(tmp_path / "missing"), "--backbone", "small", "--device", "cpu",
         "--output_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and ours == [f"error: no folder {tmp_path}/missing: it should hold train.txt, "
                                               "test.txt, database.txt and the images they list (see README, "
                                               "Datasets); or pass --data_root"]
    # torchrun's own summary (a ChildFailedError traceback) shows each process's line instead of a link
    assert result.stderr.count(f"traceback : {ours[0]}") == 2
