"""Expected mistakes end with one clear line on stderr and a non-zero exit status, never a traceback."""
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import retrieval
from network import build_network
from session.parts import resolve_backbone

ROOT = Path(__file__).resolve().parents[1]

DIGITS = ["--dataset", "digits", "--backbone", "small", "--device", "cpu"]


def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        retrieval.cli(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code != 0
    assert "Traceback" not in err
    return exit_info.value.code, err


@pytest.mark.parametrize("argv, expected", [
    (["--hash_bit", "0"], "--hash_bit: must be an integer from 1 to 8192, got '0'"),
    (["--hash_bit", "twelve"], "--hash_bit: must be an integer from 1 to 8192, got 'twelve'"),
    (["--dataset", "imagenet21k"], "--dataset: invalid choice: 'imagenet21k'"),
    (["--retrieve", "-5"], "--retrieve/--topk: must be an integer >= 0"),
    (["--topk", "-5"], "--retrieve/--topk: must be an integer >= 0"),
    (["--beta", "nan"], "--beta: must be a finite number, got 'nan'"),
    (["--epochs", "1.5"], "--epochs: '1.5' is not an integer"),
    (["--lr", "nan"], "--lr: must be a finite number, got 'nan'"),
    (["--lr", "-0.1"], "--lr: must be >= 0, got '-0.1'"),
    (["--rate", "inf"], "--rate: must be a finite number, got 'inf'"),
    (["--zeta", "1"], "--zeta: must be a cosine in [-1, 1), got 1"),
    (["--zeta", "-1.5"], "--zeta: must be a cosine in [-1, 1), got -1.5"),
    (["--seed", "-1"], "--seed: must be an integer >= 0, got '-1'"),
    (["--seed", str(2 ** 32)], "--seed: must be below 2**32"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_flags_are_rejected_by_argparse(argv, expected, capsys):
    code, err = cli_error(argv, capsys)
    assert code == 2 and expected in err


def test_voc_offline_is_one_line(capsys, tmp_path, monkeypatch):
    from data import archives

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(archives.urllib.request, "urlopen", offline)
    code, err = cli_error(["--dataset", "voc2007", "--backbone", "small", "--device", "cpu",
                           "--data_root", str(tmp_path)], capsys)
    assert code == 1 and err.strip().count("\n") == 0
    assert err.startswith("error: cannot download http://host.robots.ox.ac.uk/pascal/VOC/voc2007/"
                          "VOCtrainval_06-Nov-2007.tar ([Errno -2] Name or service not known); put "
                          "VOCtrainval_06-Nov-2007.tar (md5 c52e279531787c972589f7e41ab4ae64) and "
                          f"VOCtest_06-Nov-2007.tar (md5 b6e924de25625d8de591ea690078ad9f) into {tmp_path} and rerun")


def test_hash_bit_outside_the_code_table(capsys, tmp_path):
    code, err = cli_error(DIGITS + ["--hash_bit", "300", "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and "--hash_bit 300" in err and "--zeta" in err


def test_test_without_checkpoint(capsys, tmp_path):
    code, err = cli_error(DIGITS + ["--test", "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and f"no checkpoint at {tmp_path}/digits_small_48.ckpt" in err


def test_test_with_a_checkpoint_of_other_bits(capsys, tmp_path):
    torch.save(build_network("small", 16).state_dict(), tmp_path / "digits_small_48.ckpt")
    code, err = cli_error(DIGITS + ["--test", "--output_dir", str(tmp_path)], capsys)
    assert code == 1
    assert "hash_layer.weight is (16, 128) in the checkpoint but (48, 128) in the model" in err
    assert "Pass the --backbone and --hash_bit it was trained with" in err


def test_test_with_a_truncated_checkpoint(capsys, tmp_path):
    path = tmp_path / "digits_small_48.ckpt"
    torch.save(build_network("small", 48).state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    code, err = cli_error(DIGITS + ["--test", "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and "cannot read checkpoint" in err and "truncated" in err


def test_cuda_requested_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = cli_error(["--dataset", "digits", "--backbone", "small", "--device", "cuda"], capsys)
    assert code == 1 and "--device cuda asks for CUDA" in err


def test_real_process_exit_status_and_message(tmp_path):
    result = subprocess.run([sys.executable, "retrieval.py", "--dataset", "flickr", "--backbone", "small",
                             "--data_root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: no MIRFlickr-25k images in {tmp_path / 'flickr25k' / 'mirflickr'}")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_help_lists_the_papers_flags():
    help_text = retrieval.get_args_parser().format_help()
    for flag in ["--dataset", "--backbone", "--hash_bit", "--batch_size", "--epochs", "--beta", "--rate", "--seed",
                 "--retrieve", "--no_save", "--test", "--cuda", "--data_root", "--workers", "--lr", "--eval_every",
                 "--device"]:
        assert flag in help_text
    defaults = resolve_backbone(retrieval.get_args_parser().parse_args([]))  # no --backbone: the paper's
    assert (defaults.dataset, defaults.backbone, defaults.hash_bit, defaults.batch_size, defaults.epochs,
            defaults.beta, defaults.rate, defaults.seed, defaults.retrieve) == (
        "voc2007", "googlenet", 48, 100, 100, 0.5, 0.02, 0, 0)
