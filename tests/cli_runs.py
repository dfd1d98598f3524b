"""Calling the command-line entry points from tests: a short digits run, the exit status and output of
an entry point, where an expected mistake must never show a traceback, and a script loaded by its path."""
import importlib.util
from pathlib import Path

import pytest

import retrieval

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path):
    """The module of a script that is not in a package (docs/make_flags.py), loaded from its file."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL_DIGITS_RUN = ["--dataset", "digits", "--backbone", "small", "--hash_bit", "16", "--subset", "200",
                    "--batch_size", "20", "--eval_every", "1", "--device", "cpu"]


def run_small_digits(argv):
    return retrieval.main(retrieval.get_args_parser().parse_args(SMALL_DIGITS_RUN + argv))


def exit_status(entry_point, argv, capsys):
    """(exit status, stdout, stderr) of entry_point(argv); a clean return is status 0."""
    try:
        entry_point(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def small_digits_failure(argv, capsys):
    """(exit status, stderr) of a short digits run that must stop with a one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        retrieval.cli(SMALL_DIGITS_RUN + argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err
