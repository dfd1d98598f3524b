"""argparse value types: each turns a command-line string into a checked value or raises
argparse.ArgumentTypeError with what is wrong, which argparse reports as a usage error naming the flag."""
import argparse
import math


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_int_up_to(upper):
    """positive_int with an upper bound (a network's size: what its checkpoint's record may say, utils/checkpoint)."""
    def parse(text):
        value = positive_int(text)
        if value > upper:
            raise argparse.ArgumentTypeError(f"must be at most {upper}, got {value}")
        return value

    parse.__name__ = "positive_int"  # argparse names the type in its messages
    return parse


def non_negative_int(text):
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def inference_head(text):
    if text == "mean":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a head index (0, 1, ...) or 'mean', got {text!r}")


def finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text):
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def checked(check):
    """An argparse type from `check`, which takes a finite float and returns the value or raises ValueError
    (e.g. hashing.codetable.check_zeta): the rule lives where the value is defined, the flag reuses it."""
    def parse(text):
        try:
            return check(finite_float(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__  # argparse names the type in its messages
    return parse


def seed_value(text):
    """numpy's and the DataLoader workers' seeds take 0 <= seed < 2**32."""
    value = non_negative_int(text)
    if value >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {text!r}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where the help already says it (a default that depends on
    other flags) or there is none to show (None, or False for a switch)."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)
