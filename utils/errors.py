"""Expected mistakes (missing data, bad flag values, mismatched checkpoints) that the CLI reports as
one line and a non-zero exit status instead of a traceback."""
import sys


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""
    exit_code = 1


class TrainingInterrupted(UserError):
    """Ctrl-C during training: the message says where the resumable state is."""
    exit_code = 130


def run_reporting_errors(run, interrupted_hint=""):
    """Call run() for a command-line entry point: a UserError becomes 'error: ...' on stderr and its
    exit status, Ctrl-C a one-line note and status 130, instead of a traceback. Returns run()'s result."""
    try:
        return run()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"interrupted{interrupted_hint}", file=sys.stderr)
        sys.exit(130)
