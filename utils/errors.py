"""Expected mistakes (missing data, bad flag values, mismatched checkpoints) that the CLI reports as
one line and a non-zero exit status instead of a traceback."""
import os
import sys


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""
    exit_code = 1


class TrainingInterrupted(UserError):
    """Ctrl-C during training: the message says where the resumable state is."""
    exit_code = 130


def _torchrun_rank():
    """This process's rank when torchrun started several, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def _lost_a_peer(exc):
    """Whether `exc` is a collective failing because another torchrun process stopped (and said why)."""
    import torch.distributed as dist  # only torchrun workers get here

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(sign in text for sign in PEER_FAILURE_SIGNS))


PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")


def run_reporting_errors(run, interrupted_hint=""):
    """Call run() for a command-line entry point: a UserError becomes 'error: ...' on stderr and its
    exit status, Ctrl-C a one-line note and status 130, instead of a traceback. Returns run()'s result.

    Under torchrun, every rank reports its own UserError (print is silenced on ranks other than 0, so this
    writes to stderr directly), and a rank whose collective fails because a peer stopped says so in one
    line instead of burying the peer's message under a gloo/NCCL traceback."""
    try:
        return run()
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted{interrupted_hint}\n")
        sys.exit(130)
    except Exception as exc:
        rank = _torchrun_rank()
        if rank is None or not _lost_a_peer(exc):
            raise
        sys.stderr.write(f"error: process {rank} stopped because another torchrun process failed "
                         f"({type(exc).__name__}); that process's error above says why\n")
        sys.exit(1)
