"""Expected mistakes (missing data, bad flag values, mismatched checkpoints) that the CLI reports as
one line and a non-zero exit status instead of a traceback."""
import json
import os
import sys
import time


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


def _stop(line, exit_code):
    """Print `line` (on rank 0 only under torchrun) and exit. Under torchrun every process also leaves the line in
    its torchrun error file, which torchrun's failure summary prints in place of a link to its documentation: so
    a failure on another rank alone is still named, once, without each rank repeating rank 0's line."""
    rank = _torchrun_rank()
    if rank is None or rank == 0:
        sys.stderr.write(f"{line}\n")
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if rank is not None and error_file:
        try:
            with open(error_file, "w") as handle:
                # torchrun's own layout (its @record decorator's), with the line where it puts a traceback
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                      "timestamp": str(int(time.time()))}}}, handle)
        except OSError:
            pass
    sys.exit(exit_code)


def run_reporting_errors(run, interrupted_hint=""):
    """Call run() for a command-line entry point: a UserError becomes 'error: ...' on stderr and its
    exit status, Ctrl-C a one-line note and status 130, instead of a traceback. Returns run()'s result.

    Under torchrun only rank 0 prints (every rank usually meets the same error; print is silenced on the others,
    so this writes to stderr directly), and a rank whose collective fails because a peer stopped says so in one
    line instead of burying the peer's message under a gloo/NCCL traceback. Each rank's line also goes to torchrun's
    failure summary (_stop)."""
    try:
        return run()
    except UserError as exc:
        _stop(f"error: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        _stop(f"interrupted{interrupted_hint}", 130)
    except Exception as exc:
        rank = _torchrun_rank()
        if rank is None or not _lost_a_peer(exc):
            raise
        _stop(f"error: process {rank} stopped because another torchrun process failed ({type(exc).__name__}); "
              "torchrun's summary below names that process and its error", 1)
