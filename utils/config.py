"""Recipes as files: a YAML file of flag values (`--config FILE`), under the flags of the command line.

A recipe file is a flat mapping from flag names, written as argparse dests without dashes, to scalars
or lists of scalars, e.g.

    # configs/vit.yaml: fine-tuning recipe for vision transformers
    optimizer: adamw
    lr: 0.001
    backbone_lr_mult: 0.1

parse_args_with_config turns the file's values into flags placed before the command line's, so argparse
checks them like any flag and a flag given on the command line wins (the last value of a flag counts).
An unknown key, a value argparse refuses or a file that is not such a mapping is a UserError naming
the file and the key.
"""
import argparse
import difflib
import sys

from .errors import UserError
from .paths import read_capped, require_regular_file

MAX_CONFIG_BYTES = 1 << 20  # a recipe is a few hundred bytes


def read_config(path):
    """The mapping in the YAML file `path` ({key: scalar or list of scalars}); UserError otherwise."""
    import yaml

    path = require_regular_file(path, "--config", MAX_CONFIG_BYTES, missing="check the path (recipes are in configs/)")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(read_capped(handle, MAX_CONFIG_BYTES, f"--config {path}"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"--config {path} is not a YAML file ({str(exc).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must be a mapping of flag names to values, not a {type(values).__name__}")
    for key, value in values.items():
        scalars = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not all(isinstance(v, (str, int, float, bool)) for v in scalars):
            raise UserError(f"--config {path}: {key!r} must be a flag name with a number, a word, true/false or a "
                            "list of those")
    return values


def config_arguments(parser, values, path):
    """The command-line arguments that set `values` (read_config) on `parser`."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    arguments = []
    for key, value in values.items():
        action = actions.get(key)
        if action is None or key in ("config", "help"):
            close = difflib.get_close_matches(key, list(actions), n=3)
            raise UserError(f"--config {path}: unknown key {key!r}" + (f"; closest: {', '.join(close)}" if close else
                                                                        "") + " (keys are flag names without --)")
        flag = action.option_strings[-1]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise UserError(f"--config {path}: {key} is a switch, give it true or false")
            arguments += [flag] if value != action.default else []
        elif value is not None:
            arguments += [flag, *(format_value(v) for v in (value if isinstance(value, list) else [value]))]
    return arguments


def format_value(value):
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def parse_args_with_config(parser, argv, config_dest="config"):
    """parser.parse_args(argv) with the --config file's values under the command line's."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    path = getattr(args, config_dest, None)
    if not path:
        return args
    from_file = config_arguments(parser, read_config(path), path)
    checking = argparse.ArgumentParser(parents=[parser], add_help=False, exit_on_error=False)
    try:
        checking.parse_args(from_file + ["--" + config_dest, path])
    except argparse.ArgumentError as exc:
        raise UserError(f"--config {path}: {exc}") from None
    return parser.parse_args(from_file + argv)
