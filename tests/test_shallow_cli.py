"""retrieval.py --hasher NAME: a shallow hasher fitted on the frozen trunk's training features, evaluated, logged and
reloaded like a trained run (session/shallow.py); --trunk_from."""
import numpy as np
import pytest
import torch

import retrieval
import session.shallow
from data.registry import build_splits
from hashing.codes import CodeSet
from hashing.evaluation.metrics import map_of_codes
from hashing.shallow import ShallowHasher, load_shallow_hasher
from network import build_network, get_backbone
from session.parts import make_network
from session.run import Run
from tests.cli_runs import SMALL_DIGITS_RUN, run_small_digits, small_digits_failure
from utils.runlog import read_run_log

ITEMS = 100
HASHER_RUN = ["--freeze_backbone", "--no_progress", "--subset", str(ITEMS)]


def test_a_hasher_run_fits_on_the_training_features_then_evaluates_and_test_reloads_it(tmp_path, monkeypatch):
    """The fit sees the training split (with the evaluation transform) and nothing else: when fit() runs, the
    trunk has computed the training features only, and the features it is given are the trunk's own, computed
    here independently from the network's layers."""
    requested = []
    original_features, original_fit = session.shallow.hasher_features, ShallowHasher.fit
    fitted_on = []

    def recording_features(run, network, split_name):
        requested.append(split_name)
        return original_features(run, network, split_name)

    def checked_fit(self, features, seed):
        assert requested == ["train"]  # no query or database features exist yet
        fitted_on.append(features.clone().numpy())
        return original_fit(self, features, seed)

    monkeypatch.setattr(session.shallow, "hasher_features", recording_features)
    monkeypatch.setattr(ShallowHasher, "fit", checked_fit)
    out = tmp_path / "out"
    summary = run_small_digits(HASHER_RUN + ["--hasher", "itq", "--output_dir", str(out)])
    assert requested == ["train", "query", "database"]

    # the same trunk, rebuilt (seed 0, as the run seeds it), on the training images with the evaluation transform
    torch.manual_seed(0)
    network = build_network(get_backbone("small"), 16).eval()
    splits = build_splits("digits", "./data", 0, get_backbone("small").preprocessing, subset=ITEMS)
    images = torch.stack([splits.query.dataset.transform(splits.train.dataset.images[i:i + 1])[0]
                          for i in range(ITEMS)])
    with torch.no_grad():
        expected = network.features(images).numpy()
    np.testing.assert_allclose(fitted_on[0], expected, atol=1e-4)

    # the mAP: the saved hasher's codes of the queries and the database, scored independently of the run
    hasher = load_shallow_hasher(out / "digits_small_16_itq.ckpt")
    with torch.no_grad():
        query = network.features(torch.stack([splits.query[i][0] for i in range(ITEMS)]))
        database = network.features(torch.stack([splits.database[i][0] for i in range(ITEMS)]))
    labels = [torch.stack([split[i][1] for i in range(ITEMS)]) for split in (splits.query, splits.database)]
    codes = CodeSet.from_outputs(hasher.encode(query), labels[0], hasher.encode(database), labels[1])
    assert summary["map"] == pytest.approx(map_of_codes(codes, summary["topk"]), abs=1e-6)

    record = read_run_log(out / "digits_small_16_itq.jsonl")
    assert record["finished"] and record["trained"] is False
    assert record["hasher"] == {"hasher": "itq", "hash_bit": 16, "iterations": 50}
    assert record["best"] == {"map": summary["map"], "epoch": 0} and record["selection"]["select"] == "fit"
    assert (out / "digits_small_16_itq.metrics.json").is_file()

    monkeypatch.undo()
    (out / "digits_small_16_itq.codes.npz").unlink()  # --test encodes again with the reloaded hasher
    tested = run_small_digits(HASHER_RUN + ["--hasher", "itq", "--output_dir", str(out), "--test"])
    assert tested["map"] == pytest.approx(summary["map"], abs=1e-9)


def test_a_hasher_on_the_feature_cache_gives_the_mAP_of_the_features_computed_in_memory(tmp_path):
    in_memory = run_small_digits(HASHER_RUN + ["--hasher", "sh", "--output_dir", str(tmp_path / "a")])
    cached = run_small_digits(HASHER_RUN + ["--hasher", "sh", "--output_dir", str(tmp_path / "b"),
                                            "--feature_cache", str(tmp_path / "features")])
    assert cached["map"] == pytest.approx(in_memory["map"], abs=1e-6)
    files = sorted(path.name.split("-")[0] for path in (tmp_path / "features").glob("*.npy"))
    assert files == ["digits_small_query", "digits_small_train"]  # digits' database is the training images
    tested = run_small_digits(HASHER_RUN + ["--hasher", "sh", "--output_dir", str(tmp_path / "b"), "--test",
                                            "--feature_cache", str(tmp_path / "features")])
    assert tested["map"] == pytest.approx(in_memory["map"], abs=1e-6)


def test_test_refuses_a_hasher_fitted_on_another_trunk(tmp_path, capsys):
    out = str(tmp_path)
    run_small_digits(HASHER_RUN + ["--hasher", "pcah", "--output_dir", out])
    code, err = small_digits_failure(HASHER_RUN + ["--hasher", "pcah", "--output_dir", out, "--test", "--seed", "1"],
                                     capsys)
    assert code == 1 and "fitted on the features of another trunk" in err
    code, err = small_digits_failure(["--output_dir", out, "--test", "--checkpoint",
                                      str(tmp_path / "digits_small_16_pcah.ckpt")], capsys)
    assert code == 1 and "is a fitted shallow hasher (pcah), not a network" in err


@pytest.mark.parametrize("flags, words", [
    (["--hasher", "lsh"], "add --freeze_backbone"),
    (["--hasher", "lsh", "--freeze_backbone", "--experts", "2"], "drop --experts"),
    (["--hasher", "lsh", "--freeze_backbone", "--select", "val"], "drop --select val"),
    (["--hasher", "lsh", "--freeze_backbone", "--feature_cache", "c", "--feature_views", "2"], "drop --feature_views"),
    (["--hasher", "pcah", "--freeze_backbone", "--hash_bit", "200"], "--hash_bit 128 or fewer"),
    (["--trunk_from", "x.ckpt", "--no_pretrained"], "drop --weights / --no_pretrained"),
])
def test_bad_hasher_flags_are_refused_in_one_line(tmp_path, capsys, flags, words):
    code, err = small_digits_failure(flags + ["--output_dir", str(tmp_path)], capsys)
    assert code == 1 and words in err


def test_trunk_from_takes_the_trunk_of_a_trained_run_and_leaves_the_hash_layer(tmp_path):
    out = tmp_path / "trained"
    run_small_digits(["--epochs", "1", "--subset", str(ITEMS), "--output_dir", str(out)])
    trained = torch.load(out / "digits_small_16.ckpt", weights_only=True)
    args = retrieval.parse_args(SMALL_DIGITS_RUN + ["--hash_bit", "8", "--freeze_backbone", "--trunk_from",
                                                    str(out / "digits_small_16.ckpt")])
    network = make_network(Run(args=args, files=None, trains=True, saves=False, backbone=get_backbone("small")))
    state = network.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in trained.items() if not name.startswith("hash_"))
    assert state["hash_layer.weight"].shape == (8, 128)  # built for --hash_bit 8, not the checkpoint's 16
