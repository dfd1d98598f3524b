"""Resume, Ctrl-C, non-finite losses, full disks and unwritable folders: no work is lost and every
failure ends with one line that says what to do."""
import errno

import pytest
import torch

import loss as loss_module
import engine
import retrieval
from utils.runlog import read_run_log

from tests.cli_runs import SMALL_DIGITS_RUN as RUN
from tests.cli_runs import run_small_digits as run, small_digits_failure as cli_failure


def epochs(out):
    """The epochs' results, without their timings."""
    return [{k: e[k] for k in ("epoch", "loss", "lr", "map") if k in e}
            for e in read_run_log(out / "digits_small_16.jsonl")["epochs"]]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    full = run(["--epochs", "4", "--output_dir", str(straight)])
    run(["--epochs", "2", "--output_dir", str(resumed)])
    again = run(["--epochs", "4", "--output_dir", str(resumed), "--resume"])

    assert epochs(resumed) == epochs(straight)  # same losses and mAPs, epoch by epoch
    assert (again["map"], again["epoch"]) == (full["map"], full["epoch"])
    first = torch.load(straight / "digits_small_16.ckpt", weights_only=True)
    second = torch.load(resumed / "digits_small_16.ckpt", weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert "resumed after epoch 2" in (resumed / "digits_small_16.txt").read_text()


def test_ctrl_c_keeps_the_last_epoch_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    real_epoch = engine.train_one_epoch

    def interrupted_in_epoch_2(trainer, loader, device, epoch, context):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(trainer, loader, device, epoch, context)

    monkeypatch.setattr(engine, "train_one_epoch", interrupted_in_epoch_2)
    code, err = cli_failure(["--epochs", "3", "--output_dir", str(tmp_path), "--overwrite"], capsys)
    assert code == 130
    assert f"the state after epoch 1 is in {tmp_path}/digits_small_16.last.pt" in err and "--resume" in err
    state = torch.load(tmp_path / "digits_small_16.last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1

    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    result = run(["--epochs", "3", "--output_dir", str(tmp_path), "--resume"])
    assert [e["epoch"] for e in epochs(tmp_path)] == [1, 2, 3] and result["epoch"] >= 1


def test_non_finite_loss_stops_with_a_hint_and_keeps_the_best_checkpoint(tmp_path, capsys, monkeypatch):
    real_forward = loss_module.HyP2Loss.forward
    calls = {"n": 0}

    def nan_in_epoch_2(self, codes, labels):
        calls["n"] += 1
        value = real_forward(self, codes, labels)
        return value * float("nan") if calls["n"] == 13 else value  # 10 batches per epoch: epoch 2, step 3

    run(["--epochs", "1", "--output_dir", str(tmp_path)])
    saved = (tmp_path / "digits_small_16.ckpt").read_bytes()
    monkeypatch.setattr(loss_module.HyP2Loss, "forward", nan_in_epoch_2)
    code, err = cli_failure(["--epochs", "3", "--output_dir", str(tmp_path), "--overwrite"], capsys)
    assert code == 1
    assert "the loss became nan in epoch 2, iteration 3: lower --lr (now 0.05) or --rate (now 0.02)" in err
    assert f"the best checkpoint {tmp_path}/digits_small_16.ckpt (epoch 1" in err
    assert (tmp_path / "digits_small_16.ckpt").read_bytes() == saved  # epoch 1 stays the best checkpoint


def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, capsys, monkeypatch):
    run(["--epochs", "1", "--output_dir", str(tmp_path)])
    # The logs belong to the new run; every result and state file must keep its bytes.
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix not in (".txt", ".jsonl")}

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("utils.atomic.os.fsync", no_space)
    code, err = cli_failure(["--epochs", "1", "--output_dir", str(tmp_path), "--overwrite"], capsys)
    assert code == 1
    assert "(No space left on device); the previous file is intact" in err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix not in (".txt", ".jsonl")}
    assert after == before  # same files, same bytes, no temporary leftovers


def test_unwritable_output_folder_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = cli_failure(["--epochs", "1", "--output_dir", str(blocker / "out")], capsys)
    assert code == 1 and f"--output_dir {blocker}/out is not a writable folder" in err


def test_resume_refuses_another_experiments_state(tmp_path, capsys):
    run(["--epochs", "1", "--output_dir", str(tmp_path)])
    other_bits = [a if a != "16" else "32" for a in RUN]
    with pytest.raises(SystemExit) as exit_info:
        retrieval.cli(other_bits + ["--epochs", "2", "--output_dir", str(tmp_path),
                                    "--resume", str(tmp_path / "digits_small_16.last.pt")])
    assert exit_info.value.code == 1
    assert "was saved by a run with --hash_bit 16, this run has --hash_bit 32" in capsys.readouterr().err


def test_truncated_training_state(tmp_path, capsys):
    run(["--epochs", "1", "--output_dir", str(tmp_path)])
    state_file = tmp_path / "digits_small_16.last.pt"
    state_file.write_bytes(state_file.read_bytes()[:200])
    code, err = cli_failure(["--epochs", "2", "--output_dir", str(tmp_path), "--resume"], capsys)
    assert code == 1 and f"cannot read training state {state_file}" in err


def test_retrieve_beyond_the_database_is_clamped_with_a_warning(tmp_path, capsys):
    result = run(["--epochs", "1", "--retrieve", "5000", "--output_dir", str(tmp_path)])
    assert result["topk"] == 200
    assert "--retrieve 5000 exceeds the database (200 items); using K = 200" in capsys.readouterr().err


def test_amp_is_ignored_on_the_cpu(tmp_path):
    result = run(["--epochs", "1", "--amp", "--output_dir", str(tmp_path)])
    record = read_run_log(tmp_path / "digits_small_16.jsonl")
    assert record["amp"] == "None" and result["map"] > 0


def test_result_files_get_the_usual_permissions(tmp_path):
    from utils.atomic import write_text
    write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_no_writer_replaces_a_fifo_or_a_device_node(tmp_path):
    """atomic_write, under every result file (benchmark tables, indexes, checkpoints), keeps the writer rule."""
    import os

    from utils.atomic import write_text
    from utils.errors import UserError

    fifo = tmp_path / "table.md"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="table.md is a FIFO"):
        write_text(fifo, "| a |")
    assert fifo.is_fifo()
    with pytest.raises(UserError, match="is a character device"):
        write_text("/dev/null", "x")
    write_text(tmp_path / "ok.md", "| a |")
    assert (tmp_path / "ok.md").read_text() == "| a |"
