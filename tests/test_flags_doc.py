"""docs/FLAGS.md is generated from retrieval.py's parser: the committed copy must match it."""
from pathlib import Path

import retrieval
from tests.cli_runs import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_make_flags():
    return load_script("docs/make_flags.py")


def test_committed_flags_reference_matches_the_parser():
    make_flags = load_make_flags()
    assert make_flags.FLAGS_FILE.read_text() == make_flags.flags_markdown(retrieval.get_args_parser()), \
        "docs/FLAGS.md is out of date: run python docs/make_flags.py"


def test_every_flag_of_the_parser_is_in_the_reference():
    text = (ROOT / "docs" / "FLAGS.md").read_text()
    flags = [option for action in retrieval.get_args_parser()._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    assert flags and [flag for flag in flags if f"`{flag}" not in text and f", {flag}" not in text] == []


def test_the_check_mode_fails_on_a_stale_copy(tmp_path, monkeypatch):
    make_flags = load_make_flags()
    stale = tmp_path / "FLAGS.md"
    stale.write_text(make_flags.FLAGS_FILE.read_text().replace("--hash_bit", "--hash_bits"))
    monkeypatch.setattr(make_flags, "FLAGS_FILE", stale)
    assert make_flags.main(make_flags.argparse.Namespace(check=True)) == 1
