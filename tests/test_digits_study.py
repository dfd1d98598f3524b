"""benchmarks/digits_study.py: the convergence measure, the recipe search on a validation split, and a tiny
study end to end."""
import csv
import json
import statistics

import pytest

from benchmarks import digits_study
from utils.runlog import read_run_log


def test_converged_at_is_the_first_epoch_at_95_percent_of_the_final_map():
    maps = [0.2, 0.5, 0.9, 0.96, 0.94, 1.0]  # 95 % of 1.0 is 0.95: first reached at epoch 4
    epochs = [{"epoch": i + 1, "map": value, "train_seconds": 1.5 * (i + 1)} for i, value in enumerate(maps)]
    assert digits_study.converged_at(epochs) == (4, 6.0)
    assert digits_study.converged_at(epochs[:1]) == (1, 1.5)


def test_best_recipe_is_the_best_validation_score():
    scores = {"hyp2": {"sgd_0.05": 0.7, "sgd_0.01": 0.8, "adam_1e-3": 0.75}}
    assert digits_study.best_recipe(scores, "hyp2") == "sgd_0.01"
    assert digits_study.best_recipe(scores, "dpsh") == "sgd_0.05"  # not searched: the project's default


def test_every_loss_has_the_projects_recipes_and_one_published_optimiser():
    for loss, recipes in digits_study.SEARCH_SPACE.items():
        assert list(recipes)[:2] == ["sgd_0.05", "sgd_0.01"] and len(recipes) == 3
    assert "rmsprop_1e-3" in digits_study.SEARCH_SPACE["dpsh"] and "adam_1e-3" in digits_study.SEARCH_SPACE["orthohash"]


def test_a_tiny_study_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "study"
    argv = ["--losses", "hyp2", "--bits", "8", "--seeds", "0", "1", "--epochs", "2", "--subset", "100",
            "--val_size", "30", "--output_dir", str(out), "--device", "cpu", "--batch_size", "25", "--no_progress"]
    summary = digits_study.main(argv)
    search = {}
    for recipe in digits_study.SEARCH_SPACE["hyp2"]:
        log = read_run_log(out / "digits_study" / "search" / f"hyp2_{recipe}_24bit_seed0" / "digits_small_24.jsonl")
        assert log["args"]["select"] == "val" and all("map" not in entry for entry in log["epochs"])
        search[recipe] = log["selection"]["val_map"]
    chosen = max(search, key=search.get)
    assert summary["scores"]["hyp2"] == search

    finals = []
    for seed in (0, 1):
        log = read_run_log(out / "digits_study" / "final" / f"hyp2_{chosen}_8bit_seed{seed}" / "digits_small_8.jsonl")
        assert log["args"]["select"] == "last" and [entry["epoch"] for entry in log["epochs"]] == [1, 2]
        finals.append(log["epochs"][-1]["map"])
    with open(out / "digits_study.csv") as handle:
        row, = csv.DictReader(handle)
    assert row["recipe"] == chosen and row["runs"] == "2"
    assert float(row["map_mean"]) == pytest.approx(statistics.mean(finals))
    assert float(row["map_std"]) == pytest.approx(statistics.stdev(finals))
    assert (out / "digits_study.convergence_8.png").read_bytes()[:4] == b"\x89PNG"
    assert f"| hyp2 (`{chosen}`) |" in (out / "digits_study.md").read_text()

    # --collect tabulates the finished runs and trains nothing.
    monkeypatch.setattr(digits_study.compare, "run_cell", lambda *args: pytest.fail("trained under --collect"))
    assert digits_study.main(argv + ["--collect"])["rows"] == summary["rows"]

    # An interrupted run (its log ends before "finish") continues from its training state when the study reruns.
    monkeypatch.undo()
    log_path = out / "digits_study" / "final" / f"hyp2_{chosen}_8bit_seed1" / "digits_small_8.jsonl"
    lines = log_path.read_text().splitlines(keepends=True)
    log_path.write_text("".join(line for line in lines if '"finish"' not in line))
    assert digits_study.main(argv)["rows"][0]["runs"] == 2
    events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
    assert events.count("resume") == 1 and events[-1] == "finish"


def test_the_shared_level_is_95_percent_of_the_best_final_mean_and_read_off_the_mean_curve():
    def record(maps):
        return {"epochs": [{"epoch": i + 1, "map": m, "train_seconds": float(i + 1)} for i, m in enumerate(maps)],
                "train_seconds": float(len(maps))}

    # fast: settles at 0.5 after one epoch; slow: seeds average 0.2, 0.6, 0.9 (final mean 0.9, the best).
    results = {("fast", 8): [record([0.5, 0.5, 0.5])],
               ("slow", 8): [record([0.1, 0.5, 0.8]), record([0.3, 0.7, 1.0])]}
    options = digits_study.get_args_parser().parse_args(["--losses", "hyp2", "--bits", "8"])
    options.losses = ["fast", "slow"]
    rows = {row["loss"]: row for row in digits_study.summary_rows(options, {}, results)}
    assert rows["slow"]["shared_level"] == pytest.approx(0.95 * 0.9)
    assert rows["fast"]["epochs_to_95"] == 1 and rows["fast"]["epoch_to_shared_level"] is None
    assert rows["slow"]["epoch_to_shared_level"] == 3  # mean curve 0.2, 0.6, 0.9: first >= 0.855 at epoch 3
    assert digits_study.mean_curve(results[("slow", 8)]) == pytest.approx([(1, 0.2), (2, 0.6), (3, 0.9)])
