"""Train on a small digits subset, save, and re-test the checkpoint through the CLI's main()."""

import numpy as np
import pytest
import torch

import retrieval
from utils.runlog import read_run_log

TINY = ["--dataset", "digits", "--backbone", "small", "--hash_bit", "16", "--subset", "600",
        "--batch_size", "20", "--epochs", "8", "--eval_every", "4", "--device", "cpu"]


def run(argv):
    return retrieval.main(retrieval.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("result")
    summary = run(TINY + ["--output_dir", str(out)])
    return out, summary


def test_training_writes_checkpoint_and_logs(trained):
    out, summary = trained
    prefix = out / "digits_small_16"
    state = torch.load(prefix.with_suffix(".ckpt"), weights_only=True)
    assert state["hash_layer.weight"].shape == (16, 128)  # a plain state_dict, as the paper's code saves

    record = read_run_log(prefix.with_suffix(".jsonl"))
    assert record["finished"] and record["args"]["hash_bit"] == 16
    assert [e["epoch"] for e in record["epochs"]] == list(range(1, 9))
    evaluated = {e["epoch"]: e["map"] for e in record["epochs"] if "map" in e}
    assert sorted(evaluated) == [4, 8]  # every 4 epochs
    best_epoch = max(evaluated, key=evaluated.get)
    assert record["best"]["epoch"] == best_epoch == summary["epoch"]
    assert record["best"]["map"] == evaluated[best_epoch] == summary["map"]
    assert record["train_seconds"] > 0 and all(e["loss"] > 0 for e in record["epochs"])
    assert record["topk"] == 600 and record["zeta"] == pytest.approx(0.0)

    text = prefix.with_suffix(".txt").read_text().splitlines()
    assert text[-1].startswith(f"best mAP@600 {summary['map']:.4f} at epoch {best_epoch}")


def test_test_mode_reproduces_the_reported_map(trained, capsys):
    out, summary = trained
    result = run(TINY + ["--output_dir", str(out), "--test"])
    assert result["map"] == summary["map"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"mAP@600: {summary['map']:.4f}")


def test_same_seed_same_run(trained, tmp_path):
    out, summary = trained
    again = run(TINY + ["--output_dir", str(tmp_path)])
    first = read_run_log(out / "digits_small_16.jsonl")["epochs"]
    second = read_run_log(tmp_path / "digits_small_16.jsonl")["epochs"]
    assert [e["loss"] for e in first] == [e["loss"] for e in second]
    assert again["map"] == summary["map"]


def test_learning_beats_random_codes(trained):
    from data import digits
    from hashing.evaluation.metrics import map_at_k
    _, train_labels, _, query_labels = digits.generate(seed=0)
    rng = np.random.default_rng(0)
    chance = np.mean([map_at_k(rng.standard_normal((500, 16)), query_labels,
                               rng.standard_normal((600, 16)), train_labels[:600]) for _ in range(3)])
    _, summary = trained
    assert summary["map"] > chance + 0.15


def test_no_save_writes_nothing(tmp_path):
    run(TINY + ["--output_dir", str(tmp_path / "out"), "--no_save", "--epochs", "1"])
    assert not (tmp_path / "out").exists()


def test_test_mode_warns_when_the_split_differs_from_training(trained, capsys):
    out, _ = trained
    run(TINY + ["--output_dir", str(out), "--test", "--seed", "1"])
    assert "was trained under other settings than --seed 1 (trained with 0)" in capsys.readouterr().err
