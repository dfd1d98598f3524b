"""The run's logs: rank-0 printing, the append-only JSON-lines event log, and reading it back."""
import builtins
import json

import pytest
import torch

import retrieval
from utils import runlog
from session.files import RunFiles
from utils.runlog import RunLog, read_run_log


@pytest.fixture
def restore_print():
    original = builtins.print
    yield
    builtins.print = original
    runlog.setup_for_distributed(True)
    builtins.print = original


def test_only_the_main_process_prints(restore_print, capsys):
    runlog.setup_for_distributed(is_main=False)
    print("from rank 1")
    print("forced", force=True)
    assert capsys.readouterr().out == "forced\n"
    assert runlog.progress_bar(range(3)).disable
    runlog.setup_for_distributed(is_main=True)  # a second call wraps the original print, not the wrapper
    print("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"


def test_event_log_folds_a_resume_and_skips_a_torn_last_line(tmp_path):
    files = RunFiles(tmp_path / "digits_small_16", tmp_path / "digits_small_16.ckpt")
    log = RunLog(files)
    log.start({"args": {"epochs": 3}})
    for epoch, mean_ap in ((1, 0.5), (2, 0.6), (3, 0.4)):  # epoch 3 ran, but its state was never saved
        log.event("epoch", epoch=epoch, loss=1.0, lr=0.1, train_seconds=float(epoch), map=mean_ap)
    log.event("best", map=0.6, epoch=2, checkpoint="x.ckpt")
    RunLog(files).start({"args": {"epochs": 4}}, resumed_after=2, best={"map": 0.6, "epoch": 2})
    log.event("epoch", epoch=3, loss=0.9, lr=0.1, train_seconds=3.5, map=0.7)
    with open(files.event_log, "a") as handle:
        handle.write('{"event": "epoch", "epo')  # killed while writing
    record = read_run_log(files.event_log)
    assert [(e["epoch"], e["map"]) for e in record["epochs"]] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert record["args"] == {"epochs": 4} and record["train_seconds"] == 3.5 and not record["finished"]
    kinds = [json.loads(line)["event"] for line in files.event_log.read_text().splitlines()[:-1]]
    assert kinds == ["start", "epoch", "epoch", "epoch", "best", "resume", "epoch"]  # nothing rewritten


def test_a_new_run_replaces_the_previous_logs(tmp_path):
    files = RunFiles(tmp_path / "digits_small_16_dch", tmp_path / "digits_small_16_dch.ckpt")
    assert files.event_log.name == "digits_small_16_dch.jsonl"
    for seed in (0, 1):
        log = RunLog(files)
        log.start({"seed": seed})
        log.say(f"run {seed}")
    assert read_run_log(files.event_log)["seed"] == 1
    assert files.text_log.read_text() == "run 1\n"


def test_training_state_of_the_earlier_format_resumes(tmp_path):
    """.last.pt once also carried the log; such a file still resumes."""
    common = ["--dataset", "digits", "--backbone", "small", "--hash_bit", "16", "--subset", "200",
              "--batch_size", "20", "--device", "cpu", "--output_dir", str(tmp_path)]
    parse = retrieval.get_args_parser().parse_args
    retrieval.main(parse(common + ["--epochs", "1"]))
    last = tmp_path / "digits_small_16.last.pt"
    state = torch.load(last, weights_only=True)
    state["log"] = {"record": {"epochs": [], "best": None, "train_seconds": 0.0}, "lines": ["epoch 1"]}
    del state["content_sha256"]  # nor did such a file record a digest of its content
    torch.save(state, last)
    result = retrieval.main(parse(common + ["--epochs", "2", "--resume"]))
    assert result["epoch"] in (1, 2)
    assert [e["epoch"] for e in read_run_log(tmp_path / "digits_small_16.jsonl")["epochs"]] == [1, 2]


def test_libraries_imported_after_the_setup_find_print(tmp_path):
    """numba, imported on the first large evaluation, registers every builtin by module and name."""
    import subprocess
    import sys
    code = ("from utils.runlog import setup_for_distributed; setup_for_distributed(True); import numba; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=retrieval.__file__.rsplit("/", 1)[0], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr[-500:]
