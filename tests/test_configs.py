"""Recipes as files: --config under the command line, its keys checked, the resolved recipe in the run log,
and the harnesses' recipes read from configs/ equal to the constants they replaced."""
from pathlib import Path

import pytest

import retrieval
from benchmarks import digits_study, reproduce
from tests.cli_runs import exit_status, run_small_digits
from utils.config import config_arguments, parse_args_with_config, read_config
from utils.errors import UserError
from utils.runlog import read_run_log

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def parse(argv):
    return parse_args_with_config(retrieval.get_args_parser(), argv)


def test_a_flag_on_the_command_line_wins_over_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optimizer: adamw\nlr: 0.001\nwarmup_epochs: 3\nfreeze_backbone: true\ntop_n: [10, 20]\n")
    args = parse(["--config", str(recipe), "--lr", "0.05"])
    assert (args.optimizer, args.lr, args.warmup_epochs, args.freeze_backbone, args.top_n) == \
        ("adamw", 0.05, 3, True, [10, 20])
    assert parse(["--lr", "0.05"]).optimizer == "sgd"  # no file, the parser's defaults


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\n", "unknown key 'lrr'; closest: lr"),
    ("config: other.yaml\n", "unknown key 'config'"),
    ("lr: fast\n", "argument --lr: 'fast' is not a number"),
    ("optimizer: lbfgs\n", "argument --optimizer: invalid choice: 'lbfgs'"),
    ("freeze_backbone: 3\n", "freeze_backbone is a switch, give it true or false"),
    ("- lr\n- 0.1\n", "not a mapping"),
    ("lr: {value: 0.1}\n", "lr holds a mapping"),
])
def test_a_wrong_recipe_is_one_line_naming_the_key(tmp_path, capsys, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    code, _, err = exit_status(retrieval.cli, ["--config", str(recipe)], capsys)
    assert code == 1 and err.count("\n") == 1 and message in err and str(recipe) in err, err


def test_the_run_log_records_the_files_and_the_resolved_values(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 2\nlr: 0.01\nscheduler: cosine\n")
    out = tmp_path / "out"
    run_small_digits(["--config", str(recipe), "--lr", "0.02", "--output_dir", str(out)])
    log = read_run_log(out / "digits_small_16.jsonl")
    assert log["config"] == {"file": str(recipe), "values": {"epochs": 2, "lr": 0.01, "scheduler": "cosine"}}
    assert (log["args"]["epochs"], log["args"]["lr"], log["args"]["scheduler"]) == (2, 0.02, "cosine")
    assert len(log["epochs"]) == 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_shipped_recipe_is_a_valid_set_of_flags(path):
    flags = config_arguments(retrieval.get_args_parser(), read_config(path), path)
    assert flags and retrieval.get_args_parser().parse_args(flags)
    assert path.read_text().startswith("#")  # each says where its values come from


@pytest.mark.parametrize("table", ["voc", "flickr_nus"])
def test_the_reproduce_commands_built_from_configs_equal_the_earlier_ones(table):
    """tests/data/reproduce_*_commands.txt: the dry-run commands as printed when the recipe was a constant."""
    earlier = (ROOT / "tests" / "data" / f"reproduce_{table}_commands.txt").read_text().splitlines()
    options = reproduce.get_args_parser().parse_args(["--table", table])
    now = [reproduce.command(options, [], cell, 0) for cell in reproduce.table_cells(options)]
    parser = retrieval.get_args_parser()
    assert len(now) == len(earlier)
    for line, argv in zip(earlier, now):
        assert vars(parser.parse_args(line.split()[2:])) == vars(parser.parse_args(argv))


def test_the_digits_study_recipes_equal_the_earlier_constants():
    earlier = {"sgd_0.05": ["--optimizer", "sgd", "--lr", "0.05"], "sgd_0.01": ["--optimizer", "sgd", "--lr", "0.01"],
               "rmsprop_1e-3": ["--optimizer", "rmsprop", "--lr", "1e-3", "--weight_decay", "1e-5"],
               "adam_1e-3": ["--optimizer", "adam", "--lr", "1e-3", "--weight_decay", "1e-4", "--rate", "1e-2"]}
    parser = retrieval.get_args_parser()
    for name, flags in earlier.items():
        assert vars(parser.parse_args(digits_study.recipe_flags(name))) == vars(parser.parse_args(flags))


def test_a_fifo_or_a_huge_file_is_no_recipe(tmp_path):
    import os
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is a FIFO"):
        parse(["--config", str(fifo)])
    huge = tmp_path / "huge.yaml"
    huge.write_text("lr: 0.1\n" + "# padding\n" * 200_000)
    with pytest.raises(UserError, match="MiB"):
        parse(["--config", str(huge)])
