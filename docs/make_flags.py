"""Write docs/FLAGS.md, the flags reference of retrieval.py, from its parser (so the two cannot drift).

    python docs/make_flags.py           # rewrite docs/FLAGS.md
    python docs/make_flags.py --check   # exit 1 when docs/FLAGS.md differs from the parser (tests run this)
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import retrieval  # noqa: E402
from utils.atomic import write_text  # noqa: E402
from utils.errors import run_reporting_errors  # noqa: E402

FLAGS_FILE = ROOT / "docs" / "FLAGS.md"
HEADER = """# Flags of `retrieval.py`

Generated from the parser by `python docs/make_flags.py` (a test fails when this file and the parser
disagree); `python retrieval.py --help` prints the same. Each loss's hyper-parameters have a flag
`--{loss}_{name}` with the published default ([docs/METHOD.md](METHOD.md) §2 and §6).
"""


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def flags_markdown(parser):
    """The parser's flags as one markdown table per argument group."""
    formatter = argparse.HelpFormatter(prog=parser.prog)  # the help as written, the default in its own column
    sections = [HEADER]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if action.help is not argparse.SUPPRESS
                   and not isinstance(action, argparse._HelpAction)]
        if not actions:
            continue
        rows = ["| flag | default | what it does |", "|---|---|---|"]
        for action in actions:
            invocation = formatter._format_action_invocation(action)
            default = action.default
            shown = default is not None and default is not argparse.SUPPRESS and not isinstance(default, bool)
            default = f"`{' '.join(map(str, default)) if isinstance(default, list) else default}`" if shown else ""
            rows.append(f"| `{cell(invocation)}` | {cell(default)} | {cell(formatter._expand_help(action))} |")
        sections.append(f"## {group.title}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(sections)


def main(args):
    text = flags_markdown(retrieval.get_args_parser())
    if args.check:
        if not FLAGS_FILE.is_file() or FLAGS_FILE.read_text() != text:
            print(f"{FLAGS_FILE} differs from retrieval.py's parser: run python docs/make_flags.py",
                  file=sys.stderr)
            return 1
        return 0
    write_text(FLAGS_FILE, text)
    print(f"wrote {FLAGS_FILE}")
    return 0


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is out of date")
    sys.exit(run_reporting_errors(lambda: main(parser.parse_args(argv))))


if __name__ == "__main__":
    cli()
