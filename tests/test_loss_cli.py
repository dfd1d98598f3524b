"""--loss and its flags through the CLI: every loss trains, names its files, and logs its settings."""

import pytest

import loss
import retrieval
from test_cli import cli_error
from utils.runlog import read_run_log
from data import get_dataset_spec
from session.files import RunFiles
from session.parts import build_criterion

TINY = ["--dataset", "digits", "--backbone", "small", "--hash_bit", "12", "--subset", "40", "--batch_size", "20",
        "--epochs", "1", "--device", "cpu"]


def run(argv):
    return retrieval.main(retrieval.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("variant", [*loss.LOSSES, "proxy_anchor --hierarchy 3"])
def test_every_loss_trains_and_logs_its_settings(variant, tmp_path, capsys):
    name, *hierarchy = variant.split()
    summary = run(TINY + ["--output_dir", str(tmp_path), "--loss", name, *hierarchy])
    label = name + ("_hpl3" if hierarchy else "")
    prefix = tmp_path / ("digits_small_12" if label == "hyp2" else f"digits_small_12_{label}")
    record = read_run_log(prefix.with_suffix(".jsonl"))
    assert record["finished"] and record["args"]["loss"] == name
    assert prefix.with_suffix(".ckpt").exists() and 0 <= summary["map"] <= 1
    settings = record["loss"]
    assert settings.pop("name") == label
    expected = loss.tunable_hyperparameters(name)
    assert {key: settings[key] for key in expected} == expected
    if hierarchy:
        assert settings["hierarchy"] == 3 and settings["hierarchy_every"] == 100
    header = prefix.with_suffix(".txt").read_text().splitlines()[0]
    assert f"loss {label} (" in header and header == capsys.readouterr().out.splitlines()[0]


def test_flags_reach_the_loss(tmp_path):
    run(TINY + ["--output_dir", str(tmp_path), "--loss", "hhf", "--hhf_alpha", "8", "--hhf_delta", "0.3",
                "--zeta", "0.125"])
    settings = read_run_log(tmp_path / "digits_small_12_hhf.jsonl")["loss"]
    assert (settings["alpha"], settings["delta"], settings["zeta"], settings["quantization"]) == (8, 0.3, 0.125, 0.001)


def test_flags_default_to_the_published_values():
    args = retrieval.get_args_parser().parse_args([])
    assert args.loss == "hyp2" and args.beta == 0.5 and args.hierarchy == 0
    assert (args.proxy_anchor_alpha, args.proxy_anchor_delta) == (32, 0.1)
    assert (args.hhf_alpha, args.hhf_delta, args.hhf_quantization) == (16, 0.2, 0.001)
    assert (args.hashnet_alpha, args.hashnet_step, args.dch_gamma, args.csq_quantization) == (0.1, 20, 20, 1e-4)
    assert (args.orthohash_scale, args.orthohash_margin) == (8, 0.2)
    for name in loss.LOSSES:
        for hyperparameter in loss.LOSSES[name].HYPERPARAMETERS:
            assert getattr(args, hyperparameter.dest(name)) == hyperparameter.default
    assert loss.HyP2Loss.HYPERPARAMETERS[0].dest("hyp2") == "beta"  # the paper's flag


def test_run_names_carry_the_loss():
    parse = retrieval.get_args_parser().parse_args
    assert RunFiles.for_args(parse(["--output_dir", "r"])).prefix.name == "voc2007_googlenet_48"
    assert RunFiles.for_args(parse(["--output_dir", "r", "--loss", "dch"])).prefix.name == "voc2007_googlenet_48_dch"
    assert RunFiles.for_args(parse(["--output_dir", "r", "--hierarchy", "4"])).prefix.name == "voc2007_googlenet_48_hyp2_hpl4"


def test_hashnet_scale_is_set_every_epoch(tmp_path, monkeypatch):
    epochs = []
    original = loss.HashNetLoss.set_epoch
    monkeypatch.setattr(loss.HashNetLoss, "set_epoch", lambda self, epoch: (epochs.append(epoch), original(self, epoch)))
    run(TINY + ["--output_dir", str(tmp_path), "--loss", "hashnet", "--epochs", "2", "--eval_every", "2"])
    assert epochs == [1, 2]


def test_test_mode_finds_the_losss_checkpoint(tmp_path):
    trained = run(TINY + ["--output_dir", str(tmp_path), "--loss", "dpsh"])
    assert run(TINY + ["--output_dir", str(tmp_path), "--loss", "dpsh", "--test"])["map"] == trained["map"]


@pytest.mark.parametrize("argv, message", [
    (["--loss", "dch", "--hierarchy", "3"], "--hierarchy 3: hierarchical proxies need a proxy loss (hyp2, proxy_anchor, hhf), not dch"),
    (["--hierarchy", "10"], "--hierarchy 10: the coarse level needs 2 to 9 clusters for 10 classes"),
    (["--hierarchy", "1"], "--hierarchy 1: the coarse level needs 2 to 9 clusters for 10 classes"),
    (["--loss", "hhf", "--hash_bit", "300"], "--hash_bit 300"),
])
def test_loss_mistakes_are_one_line(argv, message, capsys, tmp_path):
    code, err = cli_error(TINY + ["--output_dir", str(tmp_path)] + argv, capsys)
    assert code == 1 and message in err and err.strip().count("\n") == 0


def test_unknown_loss_is_an_argparse_error(capsys):
    code, err = cli_error(["--loss", "triplet"], capsys)
    assert code == 2 and "--loss: invalid choice: 'triplet'" in err


def test_losses_without_zeta_accept_any_bits(tmp_path):
    # Only HyP2 and HHF need the code table; a 300-bit DPSH run must not ask for --zeta.
    args = retrieval.get_args_parser().parse_args(TINY + ["--loss", "dpsh", "--hash_bit", "300"])
    criterion = build_criterion(args, get_dataset_spec("digits"))
    assert criterion.hash_bit == 300
