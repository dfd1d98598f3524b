"""Recipes as files (configs/*.yaml, `--config FILE`): a flat YAML mapping from retrieval.py flag names, written
as argparse dests without dashes (`loss: csq`, `csq_quantization: 0.05`), to a scalar or a list of scalars.

read_config checks the file and that shape; config_arguments turns the values into the flags that set them
(an unknown key is refused there, with the closest flag names), and parse_args_with_config puts those flags
before the command line's, so argparse checks them like any flag and a flag given on the command line wins
(the last value of a flag counts).
"""
import argparse
import difflib
import sys

import yaml

from .errors import UserError
from .documents import load_yaml
from .paths import MiB, read_file_bytes

MAX_CONFIG_BYTES = MiB
SCALARS = (str, int, float, bool, type(None))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice: safe_load would keep the last value silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def describe(value):
    """'a mapping', 'an int', 'a date', ... for messages."""
    name = "mapping" if isinstance(value, dict) else type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def read_config(path):
    """{flag name: scalar or list of scalars} of a recipe file; {} for a file with comments only.

    UserError naming the file for a path that is not a regular file of at most 1 MiB, text that is not
    YAML, a top level that is not a mapping, or a key (named) that is not a string or whose value is
    neither a scalar nor a list of scalars.
    """
    text = read_file_bytes(path, "recipe file", MAX_CONFIG_BYTES)
    document = load_yaml(text, f"recipe file {path}", _UniqueKeyLoader)
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise UserError(f"recipe file {path} holds {describe(document)}, not a mapping of flag names to values "
                        "(write one `flag_name: value` per line)")
    for key, value in document.items():
        if not isinstance(key, str):
            raise UserError(f"recipe file {path}: key {key!r} is {describe(key)}, not a flag name")
        wrong = [item for item in (value if isinstance(value, list) else [value]) if not isinstance(item, SCALARS)]
        if wrong:
            raise UserError(f"recipe file {path}: {key} holds {describe(wrong[0])}; a flag takes a value or a list "
                            "of values (quote text such as dates)")
    return document


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
            arguments += value_arguments(action, flag, key, value, path)
    return arguments


def value_arguments(action, flag, key, value, path):
    """The arguments that give `flag` the value (or list of values) `value`, never read as another flag: a single
    value that begins with '-' is attached to its flag (--flag=-x); a list item that is not a number may not."""
    if not isinstance(value, list):
        text = format_value(value)
        return [f"{flag}={text}"] if text.startswith("-") else [flag, text]
    if action.nargs in (None, "?"):
        raise UserError(f"--config {path}: {key} takes one value, not a list")
    items = [format_value(item) for item in value]
    dashed = [item for item in items if item.startswith("-") and not is_number(item)]
    if dashed:
        raise UserError(f"--config {path}: {key} holds {dashed[0]!r}, which the command line would read as a flag; "
                        "a list value may not begin with '-'")
    return [flag, *items]


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_value(value):
    """A recipe value as command-line text: floats keep every digit (repr; an integral float as an integer, so it
    still sets an integer flag), booleans as true/false."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


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
