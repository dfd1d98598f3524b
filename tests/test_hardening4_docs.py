"""Issue 30, the harnesses and the docs: a long-tail study continued with more epochs, `reproduce` without the
data, `digits_study --collect` with nothing run, `bench_search` without --methods, and the pair losses' memory of
the training set's codes (DeepHash-pytorch's DPSH and DHN)."""
import json
import math
import re
import shlex
import urllib.error
from pathlib import Path

import pytest
import torch

import retrieval
from benchmarks import bench_search, digits_study, longtail_study, reproduce
from data import archives, voc
from loss import build_loss
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

    def offline(request, timeout):
        asked.append(request.full_url)
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(archives.urllib.request, "urlopen", offline)
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


# ============ 11: DPSH and DHN with DeepHash-pytorch's memory of the training set's codes ============

def memory_loss(name, **settings):
    loss = build_loss(name, 2, 2, gradient_factors=1, memory=1, **settings)
    loss.attach_training_set(3)
    return loss


def test_dpsh_with_memory_pairs_the_batch_with_every_training_code_as_deephash_pytorch_does():
    loss = memory_loss("dpsh")
    log2, softplus = math.log(2.0), lambda t: math.log(1 + math.exp(t))
    # Batch 1: items 2 and 0. The memory then holds U2 = (1, -1), U0 = (.5, .5) and an empty row U1 = 0.
    # theta = u . U_k / 2: row 1 (0, 0, 1) with s (0, 0, 1); row 2 (.25, 0, 0) with s (1, 0, 0); the mean runs
    # over the whole 2 x 3 matrix, empty row included (DeepHash-pytorch's likelihood_loss.mean()).
    first = loss(torch.tensor([[1.0, -1.0], [0.5, 0.5]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                 torch.tensor([2, 0]))
    pair = (log2 + log2 + softplus(1) - 1 + softplus(0.25) - 0.25 + log2 + log2) / 6
    quantisation = 0.1 * (0 + 0 + 0.25 + 0.25) / 4  # lambda * mean (u - sign u)^2
    assert first.item() == pytest.approx(pair + quantisation, rel=1e-6)
    # Batch 2: item 1 = (2, 0), label 0; the memory keeps batch 1's codes: theta (.5, 2, 1), s (0, 1, 1).
    codes = torch.tensor([[2.0, 0.0]], requires_grad=True)
    second = loss(codes, torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    thetas, similar = [0.5, 2.0, 1.0], [0, 1, 1]
    pair = sum(softplus(t) - s * t for t, s in zip(thetas, similar)) / 3
    assert second.item() == pytest.approx(pair + 0.1 * (1 + 0) / 2, rel=1e-6)
    second.backward()
    # d/du: (1/3) sum_k (sigmoid(theta_k) - s_k) U_k / 2 through u only (the memory is detached), plus
    # lambda * 2 (u - sign u) / 2 entries.
    memory_rows = [(0.5, 0.5), (2.0, 0.0), (1.0, -1.0)]
    sigmoid = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    expected = [sum((sigmoid(t) - s) * row[j] / 2 for t, s, row in zip(thetas, similar, memory_rows)) / 3
                + 0.1 * 2 * ((2.0, 0.0)[j] - (1.0, 0.0)[j]) / 2 for j in range(2)]
    assert codes.grad[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_dhn_with_memory_keeps_its_own_quantisation_term():
    loss = memory_loss("dhn")
    value = loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    log2 = math.log(2.0)
    pair = (math.log(1 + math.exp(2.0)) - 2.0 + log2 + log2) / 3  # theta (2, 0, 0), s (1, 0, 0)
    quantisation = 0.1 * (math.log(math.cosh(1.0)) + math.log(math.cosh(-1.0))) / 2  # log cosh(|u| - 1)
    assert value.item() == pytest.approx(pair + quantisation, rel=1e-6)


def test_the_memory_needs_one_gradient_factor_the_training_set_and_the_batchs_indices():
    with pytest.raises(ValueError, match="memory 1 pairs the batch with detached codes"):
        build_loss("dpsh", 2, 2, memory=1)
    with pytest.raises(ValueError, match="memory is 0 .* or 1"):
        build_loss("dpsh", 2, 2, memory=2)
    loss = build_loss("dpsh", 2, 2, memory=1, gradient_factors=1)
    with pytest.raises(ValueError, match="training-set size"):
        loss(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([0]))
    loss.attach_training_set(3)
    with pytest.raises(ValueError, match="item indices"):
        loss(torch.ones(1, 2), torch.ones(1, 2))


def test_a_training_run_fills_the_memory_with_every_training_items_code(tmp_path):
    out = tmp_path / "out"
    retrieval.main(retrieval.parse_args(["--dataset", "digits", "--backbone", "small", "--hash_bit", "8", "--subset",
                                         "60", "--epochs", "1", "--batch_size", "20", "--loss", "dpsh",
                                         "--dpsh_memory", "1", "--dpsh_gradient_factors", "1", "--device", "cpu",
                                         "--no_progress", "--output_dir", str(out)]))
    state = torch.load(out / "digits_small_8_dpsh.last.pt", weights_only=True)["loss"]
    codes, labels = state["memory_codes"], state["memory_labels"]
    assert codes.shape == (60, 8) and labels.shape == (60, 10)
    assert bool((codes != 0).any(dim=1).all()) and bool((labels.sum(dim=1) > 0).all())  # every item visited


# ============ 11: bench_search builds HNSW only when asked, and warns before hours of it ============

def test_bench_search_without_methods_builds_no_hnsw(tmp_path):
    assert "hnsw" not in bench_search.get_args_parser().parse_args([]).methods


def test_bench_search_warns_before_an_hnsw_build_of_millions_of_codes(tmp_path, capsys, monkeypatch):
    built = []

    def pretend(methods, database, queries, single_queries, k, rounds):
        built.extend((method, len(database)) for method in methods)
        return [{"method": method, "exact": "yes", "build_s": 0.0, "memory_mib": 0.0, "batch1_ms": 0.0,
                 "batch_ms": 0.0, "recall": 1.0, "same": 1.0} for method in methods]

    monkeypatch.setattr(bench_search, "measure_methods", pretend)
    monkeypatch.setattr(bench_search, "synthetic_codes", lambda rng, kind, count, *rest: range(count))
    monkeypatch.setattr(bench_search, "markdown_table", lambda rows, args: "table")
    args = bench_search.get_args_parser().parse_args(["--sizes", "1000", "2000000", "--codes", "uniform",
                                                      "--methods", "flat", "hnsw", "--output_dir", str(tmp_path),
                                                      "--threads", "0"])  # 0: leave the process's threads as they are
    bench_search.main(args)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "hnsw at 2,000,000 codes" in warnings[0] and "1,000 codes" not in warnings[0]
    assert built == [("flat", 1000), ("hnsw", 1000), ("flat", 2000000), ("hnsw", 2000000)]
    assert err.index("warning: ") < err.index("uniform 1,000 flat")  # said before any work


def test_the_memory_is_refused_under_torchrun_where_each_process_would_hold_its_own():
    from types import SimpleNamespace

    from data.registry import get_dataset_spec
    from session.training import training_criterion
    from utils.errors import UserError

    args = retrieval.parse_args(["--dataset", "digits", "--backbone", "small", "--loss", "dpsh", "--dpsh_memory", "1",
                                 "--dpsh_gradient_factors", "1"])
    run = SimpleNamespace(args=args, spec=get_dataset_spec("digits"), context=SimpleNamespace(world_size=2),
                          splits=SimpleNamespace(train=range(40)), class_split=None)
    with pytest.raises(UserError, match="--dpsh_memory 1 keeps the training set's codes in one process"):
        training_criterion(run)
    run.context.world_size = 1
    assert training_criterion(run).memory_codes.shape == (40, 48)
