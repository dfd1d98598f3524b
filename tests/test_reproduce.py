"""python -m benchmarks.reproduce: the paper's recipe in every command, a 2 x 2 grid end to end on a tiny
VOC2007 tree, resuming, seeds aggregated as mean ± sample std, and the cells' status."""
import csv
import json
import shlex
import urllib.error

import pytest

import retrieval
from benchmarks import reproduce
from data import archives
from fixture_files import write_voc_tree
from utils.errors import UserError
from utils.runlog import read_run_log
from session.files import RunFiles

# A small network and one epoch instead of GoogLeNet and 100: the harness, not the figures, is under test.
SMOKE = ["--backbone", "small", "--epochs", "1", "--batch_size", "10", "--device", "cpu", "--no_progress"]


@pytest.fixture(scope="module", autouse=True)
def no_download():
    """The harness fetches VOC as a run does; the tests stay off the network (the archive cannot be had)."""
    def offline(request, timeout):
        raise urllib.error.URLError("no network in the tests")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(archives.urllib.request, "urlopen", offline)
        yield


def voc_fixture(root):
    objects = [[("cat", 0)], [("dog", 0), ("person", 1)], [("car", 0)], [("person", 0), ("car", 0)]]
    trainval = {f"{i:06d}": objects[i % 4] for i in range(24)}
    test = {f"{i:06d}": objects[i % 4] for i in range(24, 34)}
    write_voc_tree(root, "2007", {"trainval": trainval, "test": test})


def grid(tmp_path, *more):
    return ["--table", "voc", "--bits", "16", "32", "--losses", "hyp2", "dhn", "--data_root", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), *more]


def test_dry_run_prints_the_papers_recipe_for_every_run(tmp_path, capsys):
    reproduce.main(grid(tmp_path, "--dry_run"))
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 2 * 2 * 2  # voc2007 and voc2012 x 2 bits x 2 losses
    expected_k = {"voc2007": 5011, "voc2012": 5717}
    for argv in commands:
        assert argv[:2] == ["python", "retrieval.py"] and "--dataset" in argv and "--hash_bit" in argv
        args = retrieval.get_args_parser().parse_args(argv[2:])
        # docs/METHOD.md §2: GoogLeNet at lr 0.02, proxies 0.02, SGD 0.9 / 5e-4, 100 epochs of 100, eval every 5.
        assert (args.backbone, args.lr, args.rate, args.optimizer, args.momentum, args.weight_decay) == \
            ("googlenet", 0.02, 0.02, "sgd", 0.9, 5e-4)
        assert (args.epochs, args.batch_size, args.eval_every, args.select) == (100, 100, 5, "test")
        assert (args.lr_step, args.lr_gamma) == (10, 0.5) and "--lr_step" in argv
        assert args.retrieve == expected_k[args.dataset]
    assert {(a[a.index("--dataset") + 1], a[a.index("--hash_bit") + 1], a[a.index("--loss") + 1])
            for a in commands} == {(d, b, m) for d in ("voc2007", "voc2012") for b in ("16", "32")
                                   for m in ("hyp2", "dhn")}


def test_flags_the_harness_sets_per_run_are_refused(tmp_path):
    with pytest.raises(UserError, match="--hash_bit"):
        reproduce.main(grid(tmp_path, "--hash_bit", "8"))


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reproduce")
    voc_fixture(tmp_path / "data")
    return tmp_path, reproduce.main(grid(tmp_path, *SMOKE))


def read_rows(tmp_path):
    with open(tmp_path / "out" / "reproduce_voc.csv") as handle:
        return {(row["dataset"], row["hash_bit"], row["method"]): row for row in csv.DictReader(handle)}


def test_a_two_by_two_grid_end_to_end(reproduced):
    tmp_path, summary = reproduced
    assert not summary["failures"]
    rows = read_rows(tmp_path)
    paper = {("16", "hyp2"): .862, ("32", "hyp2"): .917, ("16", "dhn"): .735, ("32", "dhn"): .743}  # METHOD.md §5
    for (bits, method), paper_map in paper.items():
        row = rows[("voc2007", bits, method)]
        suffix = "" if method == "hyp2" else f"_{method}"
        log = read_run_log(tmp_path / "out" / "reproduce_voc" / "voc2007" / f"{method}_{bits}bit_seed0" /
                           f"voc2007_small_{bits}{suffix}.jsonl")
        assert row["status"] == "ok" and float(row["map_mean"]) == pytest.approx(log["test_map"])
        assert float(row["paper_map"]) == paper_map
        assert float(row["difference"]) == pytest.approx(log["test_map"] - paper_map)
        assert log["args"]["backbone"] == "small" and log["args"]["select"] == "test"  # the override won
        assert log["args"]["retrieve"] == 5011 and log["topk"] == 24  # K clamped to the tiny database
    for key, row in rows.items():
        if key[0] == "voc2012":
            assert row["status"].startswith("no data: cannot download") and row["map_mean"] == ""
            assert "VOCtrainval_11-May-2012.tar" in row["status"]
    table = (tmp_path / "out" / "reproduce_voc.md").read_text()
    assert "| voc2007 | 16 | hyp2 | " in table and "Changed for every run: `--backbone small" in table


def test_a_second_invocation_reuses_finished_runs(reproduced, monkeypatch):
    tmp_path, first = reproduced

    def must_not_train(args):
        raise AssertionError(f"retrained {args.loss} {args.hash_bit}")

    monkeypatch.setattr(retrieval, "main", must_not_train)
    again = reproduce.main(grid(tmp_path, *SMOKE))
    assert [row["map_mean"] for row in again["rows"]] == [row["map_mean"] for row in first["rows"]]


def write_log(args, maps, finished=True):
    """The event log retrieval.py would write for `args`, by hand: start, the evaluated epochs, best, finish."""
    path = RunFiles.for_args(args).event_log
    path.parent.mkdir(parents=True)
    events = [{"event": "start", "args": vars(args), "topk": 5011, "data_files": {"split": "as logged"}}]
    events += [{"event": "epoch", "epoch": i + 1, "map": value, "train_seconds": 1.0} for i, value in enumerate(maps)]
    events += [{"event": "best", "map": max(maps), "epoch": 1}]
    if finished:
        events += [{"event": "finish", "test_map": max(maps), "train_seconds": 1.0}]
    path.write_text("".join(json.dumps(event) + "\n" for event in events))


def test_seeds_are_aggregated_and_unfinished_runs_shown_as_running(tmp_path):
    argv = grid(tmp_path, "--seeds", "0", "1", "--collect")
    options, overrides = reproduce.parse(argv)

    def args_of(cell, seed):
        return retrieval.get_args_parser().parse_args(reproduce.command(options, overrides, cell, seed))

    write_log(args_of(("voc2007", 16, "hyp2"), 0), [0.5])
    write_log(args_of(("voc2007", 16, "hyp2"), 1), [0.6, 0.7])
    write_log(args_of(("voc2007", 32, "dhn"), 0), [0.4], finished=False)
    (tmp_path / "data" / "VOCdevkit" / "VOC2007").mkdir(parents=True)

    reproduce.main(argv)
    rows = read_rows(tmp_path)
    both = rows[("voc2007", "16", "hyp2")]
    assert both["status"] == "ok" and both["seeds"] == "2"
    # mean and sample std of 0.5 and 0.7: 0.6 and sqrt(0.02) = 0.1414
    assert float(both["map_mean"]) == pytest.approx(0.6) and float(both["map_std"]) == pytest.approx(0.1414, abs=1e-4)
    assert rows[("voc2007", "32", "dhn")]["status"] == "running (0/2 seeds done)"
    assert rows[("voc2007", "16", "dhn")]["status"] == "not run (0/2 seeds done)"
    assert "0.600 ± 0.141 (2 seeds) | 0.862 | -0.262 | ok | split as logged |" in (
        tmp_path / "out" / "reproduce_voc.md").read_text()
    assert both["data_files"] == "split as logged" and rows[("voc2007", "16", "dhn")]["data_files"] == ""


def test_an_interrupted_run_resumes_from_its_training_state(tmp_path):
    voc_fixture(tmp_path / "data")
    one_cell = ["--table", "voc", "--bits", "16", "--losses", "hyp2", "--data_root", str(tmp_path / "data"),
                "--output_dir", str(tmp_path / "out"), *SMOKE[:2], "--epochs", "{}", *SMOKE[4:]]
    reproduce.main([token.format(1) for token in one_cell])
    # One more epoch than the finished run: its log no longer matches, but its .last.pt continues.
    reproduce.main([token.format(2) for token in one_cell])
    events = [json.loads(line)["event"] for line in
              (tmp_path / "out" / "reproduce_voc" / "voc2007" / "hyp2_16bit_seed0" / "voc2007_small_16.jsonl")
              .read_text().splitlines()]
    assert events.count("resume") == 1 and events.count("epoch") == 2 and events[-1] == "finish"


def test_time_estimate_follows_its_formula(monkeypatch):
    # torchvision documents AlexNet at 0.71 G multiply-adds per 224 image: 1.42 GFLOPs.
    assert reproduce.forward_flops("alexnet") == pytest.approx(1.42e9, rel=0.01)
    monkeypatch.setattr(reproduce, "forward_flops", lambda backbone, input_size=None: 1e9)
    compute, reading = reproduce.estimate_seconds("voc2007")
    # 100 epochs x 5,011 images x 3 passes, plus 20 evaluations x (4,952 + 5,011) images, at 1 GFLOP each
    assert compute == pytest.approx((100 * 5011 * 3 + 20 * 9963) * 1e9 / 50e12)
    assert reading == pytest.approx((100 * 5011 + 20 * 9963) / 1000)
