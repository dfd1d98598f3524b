"""The evaluation suite through the CLI on a short digits run: metrics and codes files, the codes cache,
figures, search with --query, and the FAISS index export."""
import dataclasses
import json
import shutil

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

import engine
import retrieval
from benchmarks import plot_compare
from data import digits
from network import build_network
from hashing import cache as codes_cache
from hashing.evaluation import cli as evaluate
from utils.runlog import read_run_log
from session.parts import build_splits, make_loaders
from session.run import Run

SHORT = ["--dataset", "digits", "--backbone", "small", "--hash_bit", "16", "--subset", "500", "--epochs", "3",
         "--batch_size", "20", "--eval_every", "3", "--device", "cpu"]
RUN = "digits_small_16"


def run(argv):
    return retrieval.main(retrieval.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("result")
    summary = run(SHORT + ["--output_dir", str(out), "--plots"])
    return out, summary


def test_training_writes_metrics_codes_and_figures(trained):
    out, summary = trained
    metrics = json.loads((out / f"{RUN}.metrics.json").read_text())
    assert metrics["map"] == summary["map"]  # the best checkpoint, re-encoded
    assert metrics["map_topk"] == 500 and metrics["hash_bit"] == 16
    assert metrics["precision_at_top_n"]["n"] == list(range(50, 501, 50))
    assert len(metrics["precision_recall"]["precision"]) == 17
    assert metrics["run"]["loss"] == "hyp2" and not metrics["run"]["codes_from_cache"]
    assert metrics["convention"] == {"normalize": "hits", "zero_hit": "zero", "ties": "index", "seed": 0}
    assert read_run_log(out / f"{RUN}.jsonl")["convention"] == metrics["convention"]
    for figure in ("topn", "pr", "convergence", "tsne"):
        png = (out / f"{RUN}.{figure}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, figure


def test_cached_codes_equal_a_fresh_encoding_bit_for_bit(trained):
    out, _ = trained
    args = retrieval.get_args_parser().parse_args(SHORT + ["--output_dir", str(out), "--test"])
    checkpoint = out / f"{RUN}.ckpt"
    cached, key = codes_cache.read(out / f"{RUN}.codes.npz")
    assert key["checkpoint_sha256"] == codes_cache.file_sha256(checkpoint)
    model = build_network("small", 16)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    splits = build_splits(digits.SPEC, args, 32)
    loaders = make_loaders(dataclasses.replace(Run.plan(args), spec=digits.SPEC), splits)
    for loader, bits, labels in ((loaders.query, cached.query_bits, cached.query_labels),
                                 (loaders.database, cached.database_bits, cached.database_labels)):
        outputs, true_labels = engine.encode(model, loader, torch.device("cpu"))
        np.testing.assert_array_equal(bits, np.packbits(outputs.numpy() >= 0, axis=1))
        np.testing.assert_array_equal(labels, np.packbits(true_labels.numpy() > 0, axis=1))


def test_retest_skips_the_network_and_a_changed_checkpoint_does_not(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "result"
    shutil.copytree(trained[0], out)
    first = json.loads((out / f"{RUN}.metrics.json").read_text())

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran although the codes were cached")
    monkeypatch.setattr(engine, "encode", no_network)
    again = run(SHORT + ["--output_dir", str(out), "--test"])
    assert again["map"] == first["map"] and again["metrics"]["run"]["codes_from_cache"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"mAP@500: {first['map']:.4f}")

    state = torch.load(out / f"{RUN}.ckpt", weights_only=True)
    state["hash_layer.bias"] += 0.5  # a different checkpoint under the same name
    torch.save(state, out / f"{RUN}.ckpt")
    with pytest.raises(AssertionError, match="the network ran"):
        run(SHORT + ["--output_dir", str(out), "--test"])


def test_test_under_another_convention_names_it_and_matches_the_standalone_evaluator(trained, tmp_path, capsys):
    out = tmp_path / "result"
    shutil.copytree(trained[0], out)
    convention = ["--map_normalize", "min", "--zero_hit", "skip", "--ties", "aware"]
    again = run(SHORT + ["--output_dir", str(out), "--test"] + convention)
    printed = capsys.readouterr().out
    assert f"mAP@500 (normalize=min, zero_hit=skip, ties=aware): {again['map']:.4f}" in printed
    assert "graded @500: NDCG" in printed and "left out of the means" in printed
    metrics = json.loads((out / f"{RUN}.metrics.json").read_text())
    assert metrics["convention"] == {"normalize": "min", "zero_hit": "skip", "ties": "aware", "seed": 0}
    assert 0 < metrics["ndcg"] <= 1 and metrics["acg"] > 0
    table = evaluate.cli([str(out / f"{RUN}.codes.npz"), "--topk", "500"])
    row = next(r for r in table["rows"] if (r["normalize"], r["zero_hit"], r["ties"]) == ("min", "skip", "aware"))
    assert row["map"] == pytest.approx(again["map"], abs=1e-12)
    assert row["ndcg"] == pytest.approx(metrics["ndcg"], abs=1e-12)


def save_query_mosaics(folder, count):
    """The first query mosaics of the digits split as PNG files, with their labels."""
    _, _, query_images, query_labels = digits.generate(seed=0)
    paths = []
    for i in range(count):
        paths.append(folder / f"query_{i}.png")
        Image.fromarray(query_images[i].transpose(1, 2, 0)).save(paths[-1])
    return paths, query_labels[:count]


def test_query_images_find_items_sharing_their_labels(trained, tmp_path):
    out, _ = trained
    paths, labels = save_query_mosaics(tmp_path, 40)
    result = run(SHORT + ["--output_dir", str(out), "--query", *map(str, paths), "--num_matches", "10"])
    train_labels = digits.generate(seed=0)[1][:500]
    sharing, chance = [], []
    for query_labels, found in zip(labels, result["matches"]):
        assert [m["rank"] for m in found["matches"]] == list(range(1, 11))
        distances = [m["distance"] for m in found["matches"]]
        assert distances == sorted(distances)
        sharing += [bool(query_labels[m["labels"]].any()) for m in found["matches"]]
        assert all(m["item"] == f"database #{m['index']}" for m in found["matches"])
        chance.append(np.mean(train_labels @ query_labels > 0))
    assert np.mean(sharing) > np.mean(chance) + 0.05


def test_query_image_is_encoded_like_the_query_split(trained, tmp_path):
    out, _ = trained
    paths, _ = save_query_mosaics(tmp_path, 20)
    result = run(SHORT + ["--output_dir", str(out), "--query", *map(str, paths), "--num_matches", "500"])
    cached, _ = codes_cache.read(out / f"{RUN}.codes.npz")
    query_codes = cached.query_signs()[:20]
    database_codes = cached.database_signs()
    same = 0
    for code, found in zip(query_codes, result["matches"]):
        expected = (16 - database_codes @ code) // 2
        same += all(expected[m["index"]] == m["distance"] for m in found["matches"])
    assert same >= 18  # a sign may flip where an output is within rounding of 0


def test_export_index(trained, tmp_path, capsys):
    out, _ = trained
    run(SHORT + ["--output_dir", str(out), "--export_index", str(tmp_path / "digits.index")])
    index = faiss.read_index_binary(str(tmp_path / "digits.index"))
    assert index.ntotal == 500 and index.d == 16
    assert "FAISS IndexBinaryFlat of 500 database codes" in capsys.readouterr().out


def test_compare_overlays_runs(trained, tmp_path):
    out, _ = trained
    other = tmp_path / "other"
    shutil.copytree(out, other)
    metrics = json.loads((other / f"{RUN}.metrics.json").read_text())
    metrics["run"]["loss"] = "dhn"
    metrics["precision_at_top_n"]["precision"] = [p / 2 for p in metrics["precision_at_top_n"]["precision"]]
    (other / f"{RUN}.metrics.json").write_text(json.dumps(metrics))
    written = plot_compare.main([str(out / RUN), str(other / f"{RUN}.metrics.json"), "--out", str(tmp_path / "cmp")])
    assert [p.name for p in written] == ["cmp.topn.png", "cmp.pr.png", "cmp.convergence.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    assert plot_compare.default_labels([plot_compare.load_run(out / RUN), plot_compare.load_run(other / RUN)]) \
        == ["hyp2", "dhn"]


@pytest.mark.parametrize("argv, message", [
    (["--plots", "--no_save"], "--plots writes figures and --no_save writes nothing"),
    (["--test", "--top_n", "501"], "--top_n: every N of precision@top-N must be between 1 and the database size 500"),
    (["--query", "/nonexistent/q.png"], "no query image at /nonexistent/q.png"),
])
def test_mistakes_are_one_line_errors(trained, argv, message, capsys):
    out, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        retrieval.cli(SHORT + ["--output_dir", str(out)] + argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and message in err and "Traceback" not in err


class FileDataset(torch.utils.data.Dataset):
    """Stands in for a file-based dataset: lists .paths and transforms PIL images."""

    def __init__(self, paths):
        from data.transforms import image_transform
        self.paths = paths
        self.transform = image_transform(24, train=False)

    def __len__(self):
        return len(self.paths)


def test_file_datasets_name_items_by_path_and_preprocess_pil_images(tmp_path):
    from data.query_images import item_names, query_batch
    paths, _ = save_query_mosaics(tmp_path, 3)
    database = torch.utils.data.Subset(FileDataset([f"images/{i}.jpg" for i in range(10)]), [7, 2, 5])
    assert [item_names(database)(i) for i in range(3)] == ["images/7.jpg", "images/2.jpg", "images/5.jpg"]
    batch = query_batch(paths, database, preprocessing=24)
    assert batch.shape == (3, 3, 24, 24) and batch.dtype == torch.float32
    assert abs(batch.mean().item()) < 3  # normalised, not raw 0..255 pixels
