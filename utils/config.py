"""Recipe files (configs/*.yaml): a flat YAML mapping from retrieval.py flag names, written as argparse
dests without dashes (`loss: csq`, `csq_quantization: 0.05`), to a scalar or a list of scalars.

read_config checks the file and that shape only; whether the keys are flags is the caller's to check.
"""
import yaml

from .errors import UserError
from .paths import MiB, read_capped, require_regular_file

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
    path = require_regular_file(path, "recipe file", MAX_CONFIG_BYTES)
    try:
        with open(path, "rb") as handle:
            text = read_capped(handle, MAX_CONFIG_BYTES, f"recipe file {path}")
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except OSError as exc:
        raise UserError(f"recipe file {path} cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise UserError(f"recipe file {path} is not valid YAML{line}: {problem}") from None
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
