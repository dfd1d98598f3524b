"""Issue 23, the training command line: no output lands on a run's own files, a device or a FIFO, or another
run's checkpoint (the lock covers the checkpoint path); FIFO inputs are refused without blocking; a damaged
training state does not resume; a workbook's zeta follows --zeta's rule; --help states each default once;
--export_index with a bare name writes into --output_dir; --cache_dir; truncated images are named."""
import os
import shutil
import stat

import pytest
import torch

import retrieval
from session.files import RunFiles
from tests.cli_runs import SMALL_DIGITS_RUN, exit_status, small_digits_failure
from tests.cli_runs import run_small_digits as run
from tests.fixture_files import small_list_folder
from tests.test_bad_input import cli, listed
from tests.test_codetable import _paper_style_workbook as paper_style_workbook
from tests.test_hardening_data import fail_cache_files_under
from tests.test_hardening_evaluate import deadline
from tests.test_protocol import truncated_jpeg
from utils.errors import UserError
from utils.lock import run_lock
from utils.runlog import read_run_log

RUN = "digits_small_16"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch run: checkpoint, training state, logs, codes and metrics. Tests work on copies."""
    out = tmp_path_factory.mktemp("trained")
    run(["--epochs", "1", "--output_dir", str(out)])
    return out


@pytest.fixture
def finished(trained, tmp_path):
    """A copy of the finished run, for a test to use (and change) alone."""
    return shutil.copytree(trained, tmp_path / "run")


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def fifo_at(path):
    os.mkfifo(path)
    return path


def failure(argv, capsys):
    """(exit status, stderr) of a short digits run that must stop with one line, within 20 s (never blocked)."""
    with deadline(20):
        return small_digits_failure(argv, capsys)


# ============ item 1: --export_index never lands on the run's own files or another run's ============

@pytest.mark.parametrize("name, more", [(f"{RUN}.last.pt", []), (f"{RUN}.txt", []), (f"{RUN}.jsonl", []),
                                        (f"{RUN}.codes.npz", ["--no_save"])])  # saving nothing, it keeps the cache
def test_export_index_onto_the_runs_own_files_is_refused(finished, capsys, name, more):
    before = snapshot(finished)
    code, err = failure(["--export_index", str(finished / name), "--output_dir", str(finished), *more], capsys)
    assert code == 1 and f"--export_index {finished / name} is also this run's {name}" in err
    assert snapshot(finished) == before


def test_export_index_replaces_an_earlier_index_but_no_file_of_another_kind(finished, capsys):
    other_run = finished / "digits_small_32.ckpt"  # another run's checkpoint in the same folder
    other_run.write_bytes(b"another run's checkpoint")
    code, err = failure(["--export_index", str(other_run), "--output_dir", str(finished)], capsys)
    assert code == 1 and f"--export_index {other_run} exists and is not a FAISS binary index" in err
    assert other_run.read_bytes() == b"another run's checkpoint"
    index = finished / "digits.index"
    run(["--export_index", str(index), "--output_dir", str(finished)])
    first = index.read_bytes()
    index.write_bytes(first[:-1] + bytes([first[-1] ^ 1]))  # an earlier index (changed) is replaced
    run(["--export_index", str(index), "--output_dir", str(finished)])
    assert index.read_bytes() == first


# ============ item 2: the lock covers the checkpoint path, whatever the --output_dir ============

@pytest.mark.parametrize("checkpoint_name, lock_name", [
    ("shared.ckpt", "shared.lock"),  # both runs pass --checkpoint
    (f"{RUN}.ckpt", f"{RUN}.lock"),  # the first run writes it as its default checkpoint
    ("model.pt", "model.pt.lock")])
def test_a_second_training_onto_a_checkpoint_being_written_stops(tmp_path, capsys, checkpoint_name, lock_name):
    first, checkpoint = tmp_path / "first", tmp_path / "first" / checkpoint_name
    first.mkdir()
    with run_lock(first / lock_name):  # what the first run holds while it trains
        code, err = failure(["--epochs", "1", "--checkpoint", str(checkpoint), "--output_dir",
                             str(tmp_path / "second")], capsys)
    assert code == 1 and f"{first / lock_name} is held by process " in err
    assert err.rstrip().endswith("wait for it to finish, or use another --checkpoint")
    assert not checkpoint.exists() and not (tmp_path / "second" / f"{RUN}.last.pt").exists()


def test_the_default_checkpoint_takes_only_its_runs_lock(tmp_path):
    files = RunFiles.for_args(retrieval.parse_args(SMALL_DIGITS_RUN + ["--output_dir", str(tmp_path)]))
    assert files.locks() == [(tmp_path / f"{RUN}.lock", "--output_dir")]
    elsewhere = RunFiles(files.prefix, tmp_path / "models" / "best.ckpt")
    assert elsewhere.locks() == [(tmp_path / f"{RUN}.lock", "--output_dir"),
                                 (tmp_path / "models" / "best.lock", "--checkpoint")]
    assert elsewhere.locks(writes_checkpoint=False) == [(tmp_path / f"{RUN}.lock", "--output_dir")]


def test_a_run_name_with_a_dot_keeps_its_whole_name_for_the_checkpoint(tmp_path):
    args = retrieval.parse_args(SMALL_DIGITS_RUN + ["--imbalance", "2.5", "--output_dir", str(tmp_path)])
    files = RunFiles.for_args(args)  # Path.with_suffix would cut at the dot: digits_lt2.ckpt for rho 2.5 and 2.7
    assert files.checkpoint == tmp_path / "digits_lt2.5_small_16.ckpt"
    assert files.locks() == [(tmp_path / "digits_lt2.5_small_16.lock", "--output_dir")]


# ============ item 3: outputs onto a device node or a FIFO are refused, the node left alone ============

def special_nodes(folder):
    """[(path, stat test, what the error calls it)]: a FIFO, and a copy of /dev/null where mknod is permitted."""
    nodes = [(fifo_at(folder / "fifo"), stat.S_ISFIFO, "a FIFO (named pipe)")]
    try:
        os.mknod(folder / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        nodes.append((folder / "null", stat.S_ISCHR, "a character device"))
    except PermissionError:
        pass  # not root: only the FIFO
    return nodes


def test_checkpoint_onto_a_device_or_a_fifo_is_refused(tmp_path, capsys):
    nodes = special_nodes(tmp_path)
    if len(nodes) < 2:
        pytest.skip("mknod of a character device needs root; the FIFO is tested alone")
    for node, still, kind in nodes:
        code, err = failure(["--epochs", "1", "--checkpoint", str(node), "--output_dir", str(tmp_path / "out")],
                            capsys)
        assert code == 1 and f"--checkpoint {node} is {kind}: writing there would replace it" in err
        assert still(os.stat(node).st_mode) and not (tmp_path / "out").exists()


def test_checkpoint_onto_a_fifo_is_refused(tmp_path, capsys):
    fifo = fifo_at(tmp_path / "fifo")
    code, err = failure(["--epochs", "1", "--checkpoint", str(fifo), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 1 and f"--checkpoint {fifo} is a FIFO (named pipe): writing there would replace it" in err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_export_index_onto_a_device_or_a_fifo_is_refused(finished, tmp_path, capsys):
    for node, still, kind in special_nodes(tmp_path):
        code, err = failure(["--export_index", str(node), "--output_dir", str(finished)], capsys)
        assert code == 1 and f"--export_index {node} is {kind}: writing there would replace it" in err
        assert still(os.stat(node).st_mode)
    if os.geteuid() == 0:
        assert os.stat(tmp_path / "null").st_rdev == os.makedev(1, 3)


# ============ item 4: a FIFO as an input never blocks, and the error says what it is ============

def test_a_fifo_as_resume_is_refused_without_blocking(tmp_path, capsys):
    fifo = fifo_at(tmp_path / "state.last.pt")
    code, err = failure(["--epochs", "1", "--resume", str(fifo), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 1 and f"training state {fifo} is a FIFO (named pipe), not a regular file" in err


def test_a_fifo_as_weights_is_refused_without_blocking(tmp_path, capsys):
    fifo = fifo_at(tmp_path / "weights.pth")
    code, err = failure(["--backbone", "resnet18", "--input_size", "32", "--epochs", "1", "--weights", str(fifo),
                         "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 1 and f"--weights {fifo} is a FIFO (named pipe), not a regular file" in err


def test_a_fifo_as_codetable_is_refused_without_blocking(tmp_path, capsys):
    fifo = fifo_at(tmp_path / "codetable.xlsx")
    code, err = failure(["--epochs", "1", "--codetable", str(fifo), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 1 and f"--codetable {fifo}: workbook {fifo} is a FIFO (named pipe), not a regular file" in err
    assert "folder" not in err


def test_a_fifo_as_query_image_is_refused_without_blocking(finished, tmp_path, capsys):
    fifo = fifo_at(tmp_path / "query.png")
    code, err = failure(["--query", str(fifo), "--output_dir", str(finished)], capsys)
    assert code == 1 and f"query image {fifo} is a FIFO (named pipe), not a regular file" in err


def test_a_fifo_as_the_checkpoint_to_test_is_refused_without_blocking(tmp_path, capsys):
    fifo = fifo_at(tmp_path / "model.ckpt")
    code, err = failure(["--test", "--checkpoint", str(fifo), "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and f"--checkpoint {fifo} is a FIFO (named pipe), not a regular file" in err
    assert "folder" not in err


def test_a_fifo_as_the_runs_event_log_does_not_block_test(tmp_path, capsys):
    """--test reads the run's event log (how training selected the checkpoint); a FIFO there is no log."""
    out = tmp_path / "out"
    trained = run(["--epochs", "1", "--output_dir", str(out)])
    log = out / "digits_small_16.jsonl"
    log.unlink()
    fifo_at(log)
    with deadline(60):
        code, printed, _ = exit_status(retrieval.cli, SMALL_DIGITS_RUN + ["--test", "--output_dir", str(out)], capsys)
    assert code == 0 and f"mAP@200: {trained['map']:.4f}" in printed
    with deadline(10), pytest.raises(UserError, match="is a FIFO"):
        read_run_log(log)


# ============ item 5: a damaged training state does not resume ============

def test_the_content_digest_is_canonical_and_sees_one_bit():
    from utils.checkpoint import content_digest
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {"network": {"w": tensor, "b": torch.zeros(2)}, "progress": {"epoch": 2, "best_map": 0.5}, "rng": [1, 2]}
    reordered = {"rng": [1, 2], "progress": {"best_map": 0.5, "epoch": 2}, "network": {"b": torch.zeros(2),
                                                                                       "w": tensor.clone()}}
    assert content_digest(state) == content_digest(reordered)
    flipped = tensor.clone()
    flipped.view(torch.int32).view(-1)[4] ^= 1  # the lowest mantissa bit of one element
    assert content_digest({**state, "network": {"w": flipped, "b": torch.zeros(2)}}) != content_digest(state)
    for changed in ({"w": tensor.double(), "b": torch.zeros(2)}, {"w": tensor.reshape(3, 2), "b": torch.zeros(2)}):
        assert content_digest({**state, "network": changed}) != content_digest(state)
    assert content_digest({**state, "rng": [1, 2.0]}) != content_digest(state)  # scalars by repr


def flip_one_bit(state):
    """The lowest mantissa bit of the first element of the network's first float tensor, in place."""
    tensor = next(t for t in state["network"].values() if t.dtype == torch.float32 and t.numel())
    tensor.view(torch.int32).view(-1)[0] ^= 1


def test_a_bit_flipped_in_the_training_state_is_refused_and_an_intact_or_old_state_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    run(["--epochs", "2", "--output_dir", str(out)])
    last = out / f"{RUN}.last.pt"
    state = torch.load(last, weights_only=True)
    assert len(state["content_sha256"]) == 64
    flip_one_bit(state)
    damaged = tmp_path / "damaged.last.pt"
    torch.save(state, damaged)  # the recorded digest kept: the file is a valid torch.save, its content is not
    before = snapshot(out)
    code, err = failure(["--epochs", "3", "--resume", str(damaged), "--output_dir", str(out)], capsys)
    assert code == 1 and f"{damaged} is damaged: its content differs from the digest recorded when it was saved" in err
    assert "resume from a good copy of it, or start without --resume" in err and snapshot(out) == before
    old = torch.load(last, weights_only=True)
    del old["content_sha256"]  # as states were written before digests were recorded
    torch.save(old, last)
    run(["--epochs", "3", "--resume", "--output_dir", str(out)])
    assert read_run_log(out / f"{RUN}.jsonl")["epochs"][-1]["epoch"] == 3
    assert "content_sha256" in torch.load(last, weights_only=True)  # the intact state of epoch 3 resumes too
    run(["--epochs", "4", "--resume", "--output_dir", str(out)])
    assert read_run_log(out / f"{RUN}.jsonl")["epochs"][-1]["epoch"] == 4


# ============ item 6: a workbook's zeta follows --zeta's rule ============

def test_a_workbook_zeta_outside_the_cosines_is_refused_as_the_flag_is(tmp_path, capsys):
    workbook = paper_style_workbook(tmp_path / "codetable.xlsx", overrides={(16, 4): -5})  # digits: C = 10, k = 4
    code, err = failure(["--epochs", "1", "--codetable", str(workbook), "--output_dir", str(tmp_path / "out")],
                        capsys)
    assert code == 1 and f"--codetable {workbook}: {workbook} row 16, column 4: zeta must be a cosine in [-1, 1), " \
                          "got -5; or pass --zeta VALUE" in err
    assert not (tmp_path / "out" / f"{RUN}.ckpt").exists()
    code, _, err = exit_status(retrieval.cli, SMALL_DIGITS_RUN + ["--zeta", "-5"], capsys)
    assert code == 2 and "argument --zeta: must be a cosine in [-1, 1), got -5" in err


# ============ item 7: --help states each default once, and never None ============

def test_help_shows_no_none_default_and_no_default_twice(capsys):
    parser = retrieval.get_args_parser()
    formatter = parser._get_formatter()
    twice = [action.option_strings[0] for action in parser._actions
             if action.help and formatter._expand_help(action).lower().count("default") > 1]
    assert twice == []
    code, out, _ = exit_status(retrieval.cli, ["--help"], capsys)
    assert code == 0 and "(default: None)" not in out and "--val_size" in out
    assert "(default: 100)" in out  # a plain default is still shown (--batch_size)


# ============ item 8: --export_index with a bare name goes into --output_dir ============

def test_export_index_with_a_bare_name_goes_into_the_output_dir(finished, tmp_path, capsys, monkeypatch):
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    result = run(["--export_index", "digits.index", "--output_dir", str(finished)])
    assert (finished / "digits.index").is_file() and list(here.iterdir()) == []
    assert result["index"] == str(finished / "digits.index")
    assert f"database codes written to {finished / 'digits.index'}" in capsys.readouterr().out
    for given in ("sub/digits.index", "./digits.index"):  # a folder part is honoured, relative to the current one
        run(["--export_index", given, "--output_dir", str(finished)])
        assert (here / given).is_file()


def test_a_bare_export_index_name_is_checked_where_it_is_written(finished, capsys, monkeypatch):
    monkeypatch.chdir(finished.parent)
    code, err = failure(["--export_index", f"{RUN}.last.pt", "--output_dir", str(finished)], capsys)
    assert code == 1 and f"--export_index {finished / RUN}.last.pt is also this run's {RUN}.last.pt" in err


# ============ item 9: --cache_dir ============

@pytest.fixture
def read_only_data_root(tmp_path, monkeypatch):
    """A list dataset whose folder cannot be written: by its mode, or, where the mode does not bind (root), by
    failing the cache's file creation there as a read-only file system does."""
    folder = small_list_folder(tmp_path / "data", count=12)
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        fail_cache_files_under(folder, monkeypatch)
    yield folder
    folder.chmod(0o755)


def test_cache_dir_puts_the_image_cache_outside_a_read_only_data_root(read_only_data_root, tmp_path, capsys):
    code, _, err = cli(listed(tmp_path, ["--cache"]), capsys)
    assert code == 1 and "put the cache in a writable folder with --cache_dir DIR" in err
    cache = tmp_path / "cache"
    code, _, err = cli(listed(tmp_path, ["--cache", "--cache_dir", str(cache), "--overwrite"]), capsys)
    assert code == 0, err
    assert len(list(cache.glob("list_32px_*.npy"))) == 1  # one cache of every listed image
    assert not list(read_only_data_root.rglob("*.npy"))


def test_cache_dir_without_cache_is_refused(tmp_path, capsys):
    code, err = failure(["--cache_dir", str(tmp_path), "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and "--cache_dir says where --cache keeps the image cache: add --cache" in err


# ============ item 10: truncated images are named, and all listed in the event log ============

def test_truncated_images_are_named_and_listed_in_the_log(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    names = ["images/003.png", "images/007.png", "images/011.png", "images/020.png"]
    for name in names:
        (folder / name).write_bytes(truncated_jpeg())
    paths = [str(folder / name) for name in names]
    code, out, _ = cli(listed(tmp_path), capsys)
    assert code == 0 and (f"4 truncated images were padded, as the paper's loader does (--strict_images makes them "
                          f"an error): {paths[0]}, {paths[1]}, {paths[2]} and 1 more") in out
    record = read_run_log(tmp_path / "out" / "list_small_16.jsonl")
    assert record["truncated_images"] == paths and record["truncated_image_count"] == 4
    (tmp_path / "out" / "list_small_16.codes.npz").unlink()  # --test decodes the images again
    code, out, _ = cli(listed(tmp_path, ["--test"]), capsys)
    assert code == 0 and "4 truncated images were padded" in out and f"{paths[0]}, {paths[1]}, {paths[2]}" in out

