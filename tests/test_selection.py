"""Model selection (--select test|val|last), the validation split it holds out, and --optimizer."""
import json

import pytest
import torch

import engine
import retrieval
from data import get_dataset_spec
from data.validation import draw_validation_indices, hold_out_validation
from utils.errors import UserError
from utils.runlog import read_run_log
from session.parts import build_criterion, build_trainer

TINY = ["--dataset", "digits", "--backbone", "small", "--hash_bit", "16", "--subset", "200",
        "--batch_size", "50", "--epochs", "2", "--eval_every", "1", "--device", "cpu", "--no_progress"]


def parse(argv):
    return retrieval.get_args_parser().parse_args(argv)


def run(argv):
    return retrieval.main(parse(argv))


def test_validation_indices_are_a_seeded_disjoint_partition_of_the_training_split():
    val, rest = draw_validation_indices(50, 12, seed=3)
    assert len(val) == 12 and len(rest) == 38
    assert sorted(set(val) | set(rest)) == list(range(50)) and not set(val) & set(rest)
    again, _ = draw_validation_indices(50, 12, seed=3)
    other, _ = draw_validation_indices(50, 12, seed=4)
    assert list(again) == list(val) and list(other) != list(val)
    with pytest.raises(ValueError, match="more than 50"):
        draw_validation_indices(50, 50, seed=0)


def test_validation_items_come_from_the_training_split_only():
    splits = get_dataset_spec("digits").build(None, 0, 32)
    validation = hold_out_validation(splits, 200, seed=0)
    val_indices, rest_indices = draw_validation_indices(len(splits.train), 200, 0)
    train_images = splits.train.images
    # Each validation query is the training image at its drawn index, read by the evaluation transform.
    for position in (0, 57, 199):
        image, label = validation.query[position]
        expected, expected_label = splits.query.transform(train_images[val_indices[position]][None])[0], \
            splits.train.labels[val_indices[position]]
        assert torch.equal(image, expected) and torch.equal(label, expected_label)
    assert len(validation.train) == len(validation.database) == len(splits.train) - 200
    assert list(validation.train.indices) == list(validation.database.indices) == rest_indices.tolist()
    # None of them is a test query: compare the raw pixels.
    queries = {bytes(image.numpy()) for image in splits.query.images}
    assert not any(bytes(train_images[i].numpy()) in queries for i in val_indices)


@pytest.fixture(scope="module")
def selected_by_val(tmp_path_factory):
    """A --select val run that records every encoding and every training epoch, in order."""
    out = tmp_path_factory.mktemp("val")
    calls = []
    original_encode, original_epoch = engine.encode, engine.train_one_epoch

    def recording_encode(network, loader, device, context=None, desc="encode"):
        calls.append(("encode", loader.dataset))
        return original_encode(network, loader, device, desc=desc)

    def recording_epoch(trainer, loader, device, epoch, context=None):
        calls.append(("train", epoch))
        return original_epoch(trainer, loader, device, epoch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "encode", recording_encode)
        patch.setattr(engine, "train_one_epoch", recording_epoch)
        captured = {}
        original_prepare = retrieval.prepare_run

        def keep_run(*args):
            captured["run"] = original_prepare(*args)
            return captured["run"]

        patch.setattr(retrieval, "prepare_run", keep_run)
        summary = run(TINY + ["--select", "val", "--val_size", "60", "--output_dir", str(out)])
    return out, summary, calls, captured["run"]


def test_select_val_encodes_the_test_queries_only_after_the_last_epoch(selected_by_val):
    _, _, calls, run_ = selected_by_val
    query_calls = [i for i, (kind, what) in enumerate(calls) if kind == "encode" and what is run_.loaders.query.dataset]
    last_epoch = max(i for i, (kind, _) in enumerate(calls) if kind == "train")
    assert len(query_calls) == 1 and query_calls[0] > last_epoch
    validation_encodes = [what for kind, what in calls[:query_calls[0]] if kind == "encode"]
    assert len(validation_encodes) == 2 * 2  # epochs 1 and 2: validation queries and database, nothing else
    assert all(what in (run_.validation.query.dataset, run_.validation.database.dataset) for what in validation_encodes)
    assert len(run_.splits.train) == 200 - 60 and len(run_.validation.query.dataset) == 60


def test_select_val_reports_the_kept_epochs_test_map_everywhere(selected_by_val, tmp_path):
    out, summary, _, _ = selected_by_val
    record = read_run_log(out / "digits_small_16.jsonl")
    val_maps = {e["epoch"]: e["val_map"] for e in record["epochs"]}
    assert all("map" not in e for e in record["epochs"])  # no test-query figure during training
    kept = max(val_maps, key=val_maps.get)
    assert record["selection"] == {"select": "val", "epoch": kept, "val_map": val_maps[kept]}
    assert summary["epoch"] == kept and record["test_map"] == summary["map"]
    metrics = json.loads((out / "digits_small_16.metrics.json").read_text())
    assert metrics["run"]["selection"]["select"] == "val" and metrics["map"] == pytest.approx(summary["map"])
    # The saved checkpoint is the kept epoch's: evaluated afresh (no codes cache), it gives the same mAP.
    (out / "digits_small_16.codes.npz").unlink()
    tested = run(TINY + ["--output_dir", str(out), "--test"])
    assert tested["map"] == pytest.approx(summary["map"])
    assert tested["metrics"]["run"]["selection"]["select"] == "val"
    assert "(select val, val mAP@140" in (out / "digits_small_16.txt").read_text().splitlines()[-1]


def test_a_resumed_select_val_run_names_its_validation_score_and_evaluates_the_saved_kept_epoch(tmp_path):
    one_epoch = [token if token != "2" else "1" for token in TINY]
    assert one_epoch[one_epoch.index("--epochs") + 1] == "1"
    val = ["--select", "val", "--val_size", "60", "--output_dir", str(tmp_path)]
    run(one_epoch + val)
    resumed = run(TINY + val + ["--resume"])
    resume_line = next(line for line in (tmp_path / "digits_small_16.txt").read_text().splitlines()
                       if line.startswith("resumed after epoch 1"))
    assert "(kept val mAP@140 " in resume_line
    # Kept before or after the resume (then read back from the checkpoint file), the summary's mAP is the saved
    # checkpoint's.
    (tmp_path / "digits_small_16.codes.npz").unlink()
    assert run(TINY + ["--output_dir", str(tmp_path), "--test"])["map"] == pytest.approx(resumed["map"])


def test_select_last_keeps_the_last_epoch(tmp_path):
    summary = run(TINY + ["--select", "last", "--output_dir", str(tmp_path)])
    record = read_run_log(tmp_path / "digits_small_16.jsonl")
    assert summary["epoch"] == record["best"]["epoch"] == 2
    assert summary["map"] == record["epochs"][-1]["map"] == record["test_map"]
    assert record["selection"] == {"select": "last", "epoch": 2}


@pytest.mark.parametrize("argv, message", [
    (["--val_size", "50"], "--val_size is used by --select val only"),
    (["--select", "val", "--val_size", "200"], "--val_size: a validation split of 200 items"),
])
def test_selection_flag_mistakes_are_one_line_errors(argv, message, tmp_path):
    with pytest.raises(UserError, match=message):
        run(TINY + ["--output_dir", str(tmp_path)] + argv)


@pytest.mark.parametrize("name, kind, settings", [
    ("sgd", torch.optim.SGD, {"momentum": 0.8, "weight_decay": 1e-3}),
    ("rmsprop", torch.optim.RMSprop, {"momentum": 0, "weight_decay": 1e-3}),
    ("adam", torch.optim.Adam, {"weight_decay": 1e-3}),
])
def test_optimizer_choice(name, kind, settings):
    args = parse(TINY + ["--optimizer", name, "--momentum", "0.8", "--weight_decay", "1e-3", "--lr", "0.01"])
    objective = engine.HashingObjective(torch.nn.Linear(4, 16), build_criterion(
        args, get_dataset_spec("digits")))
    trainer = build_trainer(args, objective, 0.01, torch.device("cpu"))
    assert type(trainer.optimizer) is kind
    network_group, proxy_group = trainer.optimizer.param_groups
    assert network_group["lr"] == 0.01 and proxy_group["lr"] == args.rate
    assert all(network_group[key] == value for key, value in settings.items())
