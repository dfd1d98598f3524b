"""Expected mistakes (missing data, bad flag values, mismatched checkpoints) that the CLI reports as
one line and a non-zero exit status instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""
    exit_code = 1


class TrainingInterrupted(UserError):
    """Ctrl-C during training: the message says where the resumable state is."""
    exit_code = 130
