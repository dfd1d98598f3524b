"""Issue 13: a red-team and first-hour pass. No code runs from a data file, no NaN model is saved or
scored, runs do not overwrite each other, caches and resumed states match the data they came from."""
import numpy as np
import pytest
import torch

import engine
import loss as loss_module
import retrieval
import session.parts
from hashing.codes import NonFiniteCodes, pack_signs
from session.parts import build_trainer
from tests.cli_runs import run_small_digits as run, small_digits_failure as cli_failure


# ============ item 2: NaN models ============

def test_nan_outputs_have_no_code():
    with pytest.raises(NonFiniteCodes, match="1 of 4 network outputs are NaN or infinite"):
        pack_signs(np.array([[0.5, -1.0], [np.nan, 2.0]]))


def test_a_network_that_turns_nan_is_never_saved(tmp_path, capsys, monkeypatch):
    real_epoch = engine.train_one_epoch

    def poison_after_epoch_1(trainer, loader, device, epoch, context):
        value = real_epoch(trainer, loader, device, epoch, context)
        first = next(trainer.objective.network.parameters())
        with torch.no_grad():
            first.view(-1)[0] = float("nan")  # the loss of the epoch stayed finite
        return value

    monkeypatch.setattr(engine, "train_one_epoch", poison_after_epoch_1)
    code, err = cli_failure(["--epochs", "2", "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and "became NaN or infinite in epoch 1: lower --lr" in err and "no checkpoint was saved" in err
    assert not (tmp_path / "digits_small_16.ckpt").exists() and not (tmp_path / "digits_small_16.last.pt").exists()


def test_a_nan_checkpoint_is_refused_by_test(tmp_path, capsys):
    from network import build_network
    state = build_network("small", 16).state_dict()
    next(iter(state.values())).view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "digits_small_16.ckpt")
    code, err = cli_failure(["--test", "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and "holds NaN or infinite values (1 tensors" in err
    assert not (tmp_path / "digits_small_16.metrics.json").exists()


def test_a_loss_that_is_nan_before_any_update_blames_the_loss_flags(tmp_path, capsys, monkeypatch):
    real_forward = loss_module.HyP2Loss.forward
    monkeypatch.setattr(loss_module.HyP2Loss, "forward", lambda self, c, y: real_forward(self, c, y) * float("nan"))
    code, err = cli_failure(["--epochs", "1", "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and "the loss became nan in epoch 1, iteration 1" in err
    assert "check the settings of --loss hyp2 (--beta 0.5" in err and "--lr" not in err


# ============ item 3: runs do not overwrite each other ============

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 1-epoch run (seed 0) with its checkpoint, codes and metrics; tests must not change it."""
    out = tmp_path_factory.mktemp("trained")
    run(["--epochs", "1", "--output_dir", str(out)])
    return out


def snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_a_new_training_does_not_replace_an_earlier_run(trained, capsys):
    before = snapshot(trained)
    code, err = cli_failure(["--epochs", "1", "--output_dir", str(trained)], capsys)
    assert code == 1 and f"{trained}/digits_small_16.ckpt holds an earlier run: continue it with --resume" in err
    assert "--overwrite" in err and snapshot(trained) == before


def test_overwrite_starts_afresh(tmp_path):
    run(["--epochs", "1", "--output_dir", str(tmp_path)])
    result = run(["--epochs", "1", "--output_dir", str(tmp_path), "--overwrite"])
    assert result["epoch"] == 1 and not list(tmp_path.glob("*.lock"))


def test_a_second_process_on_the_same_run_stops_at_once(tmp_path, capsys):
    from utils.lock import run_lock
    with run_lock(tmp_path / "digits_small_16.lock"):  # another open file description: as another process
        code, err = cli_failure(["--epochs", "1", "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and f"{tmp_path}/digits_small_16.lock is held by process " in err
    assert not (tmp_path / "digits_small_16.ckpt").exists()


def test_test_under_another_seed_leaves_the_runs_metrics_and_codes(trained, capsys):
    before = snapshot(trained)
    result = run(["--test", "--seed", "1", "--output_dir", str(trained)])
    err = capsys.readouterr().err
    assert "trained under other settings than --seed 1 (trained with 0)" in err and "left as they are" in err
    assert 0 <= result["map"] <= 1 and snapshot(trained) == before


@pytest.mark.parametrize("target, expected", [
    ("digits_small_16.ckpt", "--export_index {}/digits_small_16.ckpt is also --checkpoint"),
    ("digits_small_16.metrics.json", "--export_index {}/digits_small_16.metrics.json is also the metrics file")])
def test_no_output_path_equals_an_input_or_another_output(trained, capsys, target, expected):
    before = snapshot(trained)
    code, err = cli_failure(["--export_index", str(trained / target), "--output_dir", str(trained)], capsys)
    assert code == 1 and expected.format(trained) in err and snapshot(trained) == before


def test_checkpoint_onto_the_weights_file_is_refused(tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"weights")
    code, err = cli_failure(["--weights", str(weights), "--checkpoint", str(weights), "--output_dir",
                             str(tmp_path)], capsys)
    assert code == 1 and f"--checkpoint {weights} is also --weights" in err and weights.read_bytes() == b"weights"


def test_test_checks_the_checkpoint_before_building_the_data(tmp_path, capsys, monkeypatch):
    import data.registry
    monkeypatch.setattr(data.registry, "get_dataset_spec", lambda name: pytest.fail("the data was built"))
    monkeypatch.setattr(session.parts, "get_dataset_spec", lambda name: pytest.fail("the data was built"))
    code, err = cli_failure(["--test", "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and f"no checkpoint at {tmp_path}/digits_small_16.ckpt" in err
    code, err = cli_failure(["--test", "--checkpoint", str(tmp_path), "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and f"--checkpoint {tmp_path} is a folder" in err


# ============ item 4: the codes cache follows the data ============

def list_run(tmp_path, *extra):
    from tests.fixture_files import small_list_folder
    if not (tmp_path / "data").exists():
        small_list_folder(tmp_path / "data")
    return ["--dataset", "list", "--data_root", str(tmp_path / "data"), "--backbone", "small", "--hash_bit", "16",
            "--batch_size", "8", "--device", "cpu", "--workers", "0", *extra]


def main(argv):
    return retrieval.main(retrieval.get_args_parser().parse_args(argv))


def test_test_does_not_reuse_codes_after_the_labels_change(tmp_path):
    import shutil
    out = tmp_path / "out"
    main(list_run(tmp_path, "--epochs", "1", "--output_dir", str(out)))
    assert main(list_run(tmp_path, "--test", "--output_dir", str(out)))["metrics"]["run"]["codes_from_cache"]
    test_list = tmp_path / "data" / "test.txt"
    rows = test_list.read_text().splitlines()
    test_list.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # labels move to other images

    after = main(list_run(tmp_path, "--test", "--output_dir", str(out)))
    fresh_out = tmp_path / "fresh"  # the same checkpoint evaluated with no cache at all
    fresh_out.mkdir()
    shutil.copy(out / "list_small_16.ckpt", fresh_out)
    truth = main(list_run(tmp_path, "--test", "--output_dir", str(fresh_out)))
    assert not after["metrics"]["run"]["codes_from_cache"] and after["map"] == truth["map"]


def test_split_fingerprint_changes_with_labels_order_and_image_files(tmp_path):
    import os
    from data.files import ImageFileDataset
    from data.fingerprint import split_fingerprint
    from torch.utils.data import Subset
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path in paths:
        path.write_bytes(b"png")
    labels = np.eye(3)
    base = split_fingerprint(ImageFileDataset(paths, labels, None))
    assert split_fingerprint(ImageFileDataset(paths, labels, None)) == base
    assert split_fingerprint(ImageFileDataset(paths, labels[[1, 0, 2]], None)) != base
    assert split_fingerprint(Subset(ImageFileDataset(paths, labels, None), [1, 0, 2])) != base
    os.utime(paths[2], ns=(1, 1))  # an image replaced in place
    assert split_fingerprint(ImageFileDataset(paths, labels, None)) != base


# ============ item 5: resume is bit-identical with DataLoader workers ============

def test_resume_with_workers_equals_an_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--workers", "2", "--eval_every", "1"]
    full = main(list_run(tmp_path, *common, "--epochs", "3", "--output_dir", str(straight)))
    main(list_run(tmp_path, *common, "--epochs", "1", "--output_dir", str(resumed)))
    again = main(list_run(tmp_path, *common, "--epochs", "3", "--output_dir", str(resumed), "--resume"))
    first = torch.load(straight / "list_small_16.last.pt", weights_only=True)["network"]
    second = torch.load(resumed / "list_small_16.last.pt", weights_only=True)["network"]
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert (again["map"], again["epoch"]) == (full["map"], full["epoch"])


# ============ tracebacks turned into one-line errors ============

def test_a_last_training_batch_of_one_sample_is_left_out(tmp_path):
    # 199 training images in batches of 3: 66 full batches and a last batch of 1, which BatchNorm cannot train on.
    result = run(["--subset", "199", "--batch_size", "3", "--epochs", "1", "--no_save", "--eval_every", "1"])
    assert result["epoch"] == 1


@pytest.mark.parametrize("argv, expected", [
    (["--batch_size", "1"], "--batch_size 1 over 1 process(es) and a train split of 200 give 1"),
    (["--subset", "1"], "a train split of 1 give 1"),
])
def test_batches_of_one_sample_are_refused(argv, expected, capsys, tmp_path):
    code, err = cli_failure(["--epochs", "1", "--output_dir", str(tmp_path), *argv], capsys)
    assert code == 1 and expected in err


# ============ item 6: --resume checks the data ============

def five_class_list_folder(folder):
    from tests.fixture_files import write_list_folder
    rows = [(f"images/{index:03d}.png", [int(index % 5 == c or (index + 1) % 5 == c) for c in range(5)])
            for index in range(24)]
    return write_list_folder(folder, {"train.txt": rows[:16], "database.txt": rows[:16], "test.txt": rows[16:]})


def test_resume_refuses_a_state_of_other_data(tmp_path, capsys):
    main(list_run(tmp_path, "--epochs", "1", "--output_dir", str(tmp_path / "out")))
    state = tmp_path / "out" / "list_small_16.last.pt"
    other_classes = five_class_list_folder(tmp_path / "five")
    argv = list_run(tmp_path, "--epochs", "2", "--output_dir", str(tmp_path / "out"), "--resume")
    argv[argv.index("--data_root") + 1] = str(other_classes)
    with pytest.raises(SystemExit):
        retrieval.cli(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{state} was saved by a run on other data (its data_root, classes" in err

    rows = (tmp_path / "data" / "train.txt").read_text().splitlines()  # same classes, other labels
    (tmp_path / "data" / "train.txt").write_text("\n".join(rows[::-1]) + "\n")
    with pytest.raises(SystemExit):
        retrieval.cli(list_run(tmp_path, "--epochs", "2", "--output_dir", str(tmp_path / "out"), "--resume"))
    assert "on other data (its train split differ" in capsys.readouterr().err


def test_resume_refuses_the_state_of_a_run_in_another_folder(trained, tmp_path, capsys):
    code, err = cli_failure(["--epochs", "2", "--output_dir", str(tmp_path), "--resume",
                             str(trained / "digits_small_16.last.pt")], capsys)
    assert code == 1
    assert f"whose checkpoint is {trained}/digits_small_16.ckpt, not {tmp_path}/digits_small_16.ckpt" in err


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    from PIL import Image
    from data.files import read_rgb
    values = np.array([[0, 257, 32896], [65535, 1000, 51400]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # a 16-bit grey PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(read_rgb(tmp_path / "deep.png"))
    expected = np.rint(values / 257).astype(np.uint8)  # 65535 / 257 = 255
    assert rgb.shape == (2, 3, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)


def test_a_bom_in_a_list_file_is_ignored(tmp_path):
    from data.lists import read_list
    from tests.fixture_files import small_list_folder
    folder = small_list_folder(tmp_path / "data")
    plain = read_list(folder / "test.txt")
    (folder / "test.txt").write_bytes(b"\xef\xbb\xbf" + (folder / "test.txt").read_bytes())
    with_bom = read_list(folder / "test.txt")
    assert with_bom[0] == plain[0] and np.array_equal(with_bom[1], plain[1])


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    import errno
    from utils.checkpoint import save
    from utils.errors import UserError

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("utils.atomic.os.fsync", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        save({"weight": torch.zeros(3)}, tmp_path / "x.ckpt")
    assert not list(tmp_path.iterdir())


def test_torch_save_errors_become_one_line(tmp_path, monkeypatch):
    """torch.save writing to a full disk raises RuntimeError; the checkpoint is now serialised in memory."""
    from utils.checkpoint import save
    real_save = torch.save

    def fails_on_files(obj, target):
        if not hasattr(target, "getbuffer"):
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")
        return real_save(obj, target)
    monkeypatch.setattr(torch, "save", fails_on_files)
    save({"weight": torch.ones(2)}, tmp_path / "x.ckpt")
    assert torch.equal(torch.load(tmp_path / "x.ckpt", weights_only=True)["weight"], torch.ones(2))


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_devices_other_than_cpu_and_cuda_are_refused(device, capsys):
    code, err = cli_failure(["--device", device, "--epochs", "1", "--no_save"], capsys)
    assert code == 1 and f"--device {device}: this tool runs on the CPU or CUDA only" in err


def test_leftover_temporary_files_are_removed_by_the_next_run(tmp_path, capsys):
    leftover = tmp_path / ".digits_small_16.ckpt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    unrelated = tmp_path / ".other.ckpt.abc123.tmp"
    unrelated.write_bytes(b"another run's")
    code, err = cli_failure(["--epochs", "1", "--output_dir", str(tmp_path), "--batch_size", "1"], capsys)
    assert "removed 1 temporary file(s)" in err and not leftover.exists() and unrelated.exists()


def test_top_n_and_checkpoint_are_checked_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: pytest.fail("training started"))
    code, err = cli_failure(["--epochs", "1", "--output_dir", str(tmp_path), "--top_n", "201"], capsys)
    assert code == 1 and "--top_n: every N of precision@top-N must be between 1 and the database size 200" in err
    code, err = cli_failure(["--epochs", "1", "--output_dir", str(tmp_path), "--checkpoint", str(tmp_path)], capsys)
    assert code == 1 and f"--checkpoint {tmp_path} is a folder" in err


def test_plots_of_a_tiny_database_skip_the_tsne(tmp_path, capsys):
    run(["--subset", "2", "--batch_size", "2", "--epochs", "1", "--output_dir", str(tmp_path)])
    run(["--subset", "2", "--batch_size", "2", "--test", "--plots", "--plot_format", "pdf", "--output_dir",
         str(tmp_path)])
    err = capsys.readouterr().err
    assert "a t-SNE needs at least 3 database items, this database has 2" in err
    assert (tmp_path / "digits_small_16.topn.pdf").read_bytes().startswith(b"%PDF")
    assert not list(tmp_path.glob("*.tsne.*"))


def test_a_damaged_image_cache_is_rebuilt_with_a_note(tmp_path, capsys):
    argv = list_run(tmp_path, "--epochs", "1", "--no_save", "--cache")
    first = main(argv)
    (cache_file,) = (tmp_path / "data").rglob("*.npy")
    cache_file.write_bytes(b"replaced by something else")
    capsys.readouterr()
    again = main(argv)
    assert f"the image cache {cache_file} is unusable" in capsys.readouterr().err
    assert again["map"] == first["map"] and np.load(cache_file).dtype == np.uint8


@pytest.mark.parametrize("limit", [100, 40])  # the 8x8 image is over the limit; over twice the limit
def test_a_query_image_over_the_pixel_limit_is_one_line(trained, tmp_path, capsys, monkeypatch, limit):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit // 2)
    code, err = cli_failure(["--query", str(tmp_path / "big.png"), "--output_dir", str(trained)], capsys)
    assert code == 1 and f"query image {tmp_path}/big.png" in err and "pixels" in err


# ============ first-hour fixes ============

def test_optimiser_settings_are_flags_with_the_papers_defaults(trained):
    from utils.runlog import read_run_log
    recorded = read_run_log(trained / "digits_small_16.jsonl")["args"]
    assert (recorded["momentum"], recorded["weight_decay"], recorded["lr_step"], recorded["lr_gamma"]) == \
        (0.9, 5e-4, 10, 0.5)  # docs/METHOD.md §2
    args = retrieval.get_args_parser().parse_args(["--momentum", "0.5", "--weight_decay", "0", "--lr_step", "3",
                                                   "--lr_gamma", "0.1"])
    objective = engine.HashingObjective(torch.nn.Linear(2, 2), torch.nn.Module())
    trainer = build_trainer(args, objective, 0.1, torch.device("cpu"))
    group = trainer.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.5, 0)
    assert (trainer.scheduler.step_size, trainer.scheduler.gamma) == (3, 0.1)


def test_query_digits_n_searches_with_the_n_th_query_mosaic(trained, capsys):
    from hashing.cache import read
    result = run(["--query", "digits:3", "digits:0", "--num_matches", "5", "--output_dir", str(trained)])
    codes, _ = read(trained / "digits_small_16.codes.npz")
    for item, found in zip((3, 0), result["matches"]):  # the query split's own code, brute-force ranked
        distances = np.count_nonzero(codes.database_signs() != codes.query_signs()[item], axis=1)
        order = np.lexsort((np.arange(len(distances)), distances))[:5]
        assert [m["index"] for m in found["matches"]] == order.tolist()
    code, err = cli_failure(["--query", "digits:999", "--output_dir", str(trained)], capsys)
    assert code == 1 and "--query digits:999: the query split of --dataset digits has 200 images" in err


def test_plot_format_and_an_epoch_axis_on_the_convergence_figure(tmp_path, monkeypatch):
    from hashing.evaluation import plots
    log = {"topk": 10, "epochs": [{"epoch": 1, "train_seconds": 4.0, "map": 0.5},
                                  {"epoch": 2, "train_seconds": 9.0},
                                  {"epoch": 3, "train_seconds": 15.0, "map": 0.7}]}
    drawn = {}
    real_finish = plots._finish

    def keep_axes(figure, axes, path, legend=True):
        drawn["axes"] = figure.axes
        return real_finish(figure, axes, path, legend)
    monkeypatch.setattr(plots, "_finish", keep_axes)
    path = plots.plot_convergence([("hyp2", log)], tmp_path / "run.convergence.svg", "t")
    by_epoch, by_time = drawn["axes"]
    assert by_epoch.get_xlabel() == "epoch" and by_epoch.lines[0].get_xdata().tolist() == [1, 3]
    assert by_time.lines[0].get_xdata().tolist() == [4.0, 15.0] and by_epoch.get_ylabel() == "mAP@10"
    assert path.read_bytes().lstrip().startswith(b"<?xml") and b"<svg" in path.read_bytes()


def test_a_torchrun_peer_of_a_failed_process_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    import json
    import torch.distributed as dist
    from utils.errors import UserError, run_reporting_errors

    def collective_fails():
        raise dist.DistBackendError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")

    def torchrun_summary_line():
        return json.loads((tmp_path / "error.json").read_text())["message"]["extraInfo"]["py_callstack"]

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(collective_fails)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: process 0 stopped because another torchrun process failed (DistBackendError)")
    assert torchrun_summary_line() == err.strip()

    def user_error_on_rank_1():
        raise UserError("no folder data/x")

    monkeypatch.setenv("RANK", "1")  # issue 23: ranks other than 0 stay silent; torchrun's summary shows their line
    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: None)  # as on ranks other than 0
    with pytest.raises(SystemExit):
        run_reporting_errors(user_error_on_rank_1)
    assert capsys.readouterr().err == "" and torchrun_summary_line() == "error: no folder data/x"

    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process: a backend error is a bug, shown in full
    with pytest.raises(dist.DistBackendError):
        run_reporting_errors(collective_fails)
