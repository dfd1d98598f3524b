"""Nested codes (--nested_bits, docs/METHOD.md §14): a prefix of a packed code is the packed prefix of the outputs;
the nested loss is the weighted sum of per-length losses built on their own; a checkpoint tested at each length
gives what training reported; bad lengths are refused in one line; the API and the page search a prefix as a
brute-force loop over truncated codes does."""
import argparse

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

import retrieval
from data import get_dataset_spec
from hashing import codetable
from hashing.codes import CodeSet, pack_signs, prefix_bits
from hashing.evaluation.metrics import map_of_codes
from hashing.search import server as serve
from hashing.search.api import load_checkpoint
from loss import NestedLoss, build_loss
from network import OutputPrefix, build_network
from session.parts import build_criterion
from tests.cli_runs import SMALL_DIGITS_RUN, exit_status, small_digits_failure
from utils.checkpoint import read_backbone_record
from utils.errors import UserError

NESTED = ["--nested_bits", "4", "8", "16"]
RUN = SMALL_DIGITS_RUN + ["--epochs", "2", "--no_progress"] + NESTED


@pytest.mark.parametrize("width", [5, 16, 37, 64])
def test_a_packed_prefix_is_the_packed_code_of_the_first_outputs(width):
    outputs = torch.randn(30, width, generator=torch.Generator().manual_seed(width))
    outputs[0, : width // 2] = 0.0  # 0 counts as +1 on both sides
    packed = pack_signs(outputs)
    labels = np.ones((30, 1))
    codes = CodeSet.from_outputs(outputs, labels, outputs, labels)
    for bits in range(1, width + 1):
        expected = pack_signs(outputs[:, :bits])
        assert np.array_equal(prefix_bits(packed, bits), expected)
        assert np.array_equal(codes.prefix(bits).database_bits, expected)
        assert codes.prefix(bits).hash_bit == bits


def test_the_b_bit_head_of_a_network_is_its_first_b_outputs():
    network = build_network("small", 16).eval()
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        whole = network(images)
        for bits in (1, 4, 9, 16):
            head = OutputPrefix(network, bits)(images)
            assert torch.equal(head, whole[:, :bits])
            assert np.array_equal(pack_signs(head), prefix_bits(pack_signs(whole), bits))


def nested_args(loss, lengths, weights=None):
    args = retrieval.parse_args(["--loss", loss, "--hash_bit", str(lengths[-1]), "--nested_bits", *map(str, lengths)]
                                + (["--nested_weights", *map(str, weights)] if weights else []))
    return args


@pytest.mark.parametrize("loss", ["hyp2", "csq", "orthohash"])
def test_the_nested_loss_is_the_weighted_sum_of_losses_built_per_length(loss):
    spec = get_dataset_spec("digits")
    lengths, weights = [8, 16, 32], [0.5, 1.0, 2.0]
    nested = build_criterion(nested_args(loss, lengths, weights), spec)
    assert isinstance(nested, NestedLoss) and nested.lengths == lengths
    generator = torch.Generator().manual_seed(3)
    codes = torch.randn(24, 32, generator=generator)
    labels = (torch.rand(24, spec.num_classes, generator=generator) < 0.3).float()
    labels[:, 0] = 1.0
    expected = 0.0
    for bits, weight, inner in zip(lengths, weights, nested.prefix_losses):
        zeta = codetable.zeta(bits, spec.num_classes) if loss == "hyp2" else None
        fresh = build_loss(loss, spec.num_classes, bits, zeta=zeta, seed=0)
        if loss == "hyp2":  # learnable proxies: the same ones; each of b dimensions and its own zeta
            assert inner.proxies.shape == (spec.num_classes, bits) and inner.zeta == zeta
            fresh.proxies.data.copy_(inner.proxies.data)
        if loss == "csq":  # the centres of b bits, drawn from the seed: the fresh loss draws the same
            assert torch.equal(fresh.centres, inner.centres) and fresh.centres.shape[1] == bits
        if loss == "orthohash":
            assert torch.equal(fresh.codebook, inner.codebook) and fresh.codebook.shape[1] == bits
        expected = expected + weight * fresh(codes[:, :bits].clone(), labels).detach()
    assert nested(codes, labels).detach().item() == pytest.approx(float(expected), rel=1e-6)


def test_each_prefix_of_hyp2_has_the_code_table_zeta_of_its_length():
    nested = build_criterion(nested_args("hyp2", [4, 6, 64]), get_dataset_spec("digits"))
    # 10 classes, k = 4 (docs/METHOD.md §1): zeta = 1 - 2d/n with the best [n, 4] code's distance d: all of F_2^4
    # (d 1), a parity-check code (d 2), and d 33 at n 64, where Griesmer's 33 + 17 + 9 + 5 = 64 is met
    assert nested.hyperparameters()["nested_zetas"] == pytest.approx([0.5, 1 / 3, -0.03125])


@pytest.mark.parametrize("flags, says", [
    (["--nested_bits", "8", "4", "16"], "ascending"),
    (["--nested_bits", "4", "8"], "last length"),
    (["--nested_bits", "0", "16"], "--nested_bits"),
    (["--nested_bits", "8", "16", "--zeta", "0.2"], "--zeta"),
    (["--nested_bits", "8", "16", "--experts", "2"], "--experts"),
    (["--nested_bits", "8", "16", "--nested_weights", "1"], "--nested_weights"),
    (["--nested_weights", "1"], "--nested_weights"),
    (["--nested_bits", "8", "16", "--loss", "dpsh", "--dpsh_memory", "1"], "memory"),
    (["--prefix_bits", "8"], "--prefix_bits"),
])
def test_bad_nested_flags_are_refused_in_one_line(flags, says, capsys, tmp_path):
    code, err = small_digits_failure(flags + ["--output_dir", str(tmp_path), "--epochs", "1"], capsys)
    assert code != 0 and says in err.strip().splitlines()[-1]  # argparse's usage may come first


def test_nested_loss_refuses_lengths_that_do_not_ascend():
    with pytest.raises(ValueError, match="ascending"):
        NestedLoss([build_loss("csq", 4, 16), build_loss("csq", 4, 8)])


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory):
    """(output folder, checkpoint, the metrics training wrote) of a tiny nested digits run."""
    out = tmp_path_factory.mktemp("nested")
    reported = retrieval.main(retrieval.parse_args(RUN + ["--output_dir", str(out)]))
    return out, out / "digits_small_16_nested4-8-16.ckpt", reported


def test_the_checkpoint_records_its_lengths_and_tests_to_the_reported_figures(nested_run, capsys):
    out, checkpoint, reported = nested_run
    assert read_backbone_record(checkpoint)["nested_bits"] == [4, 8, 16]
    assert list(reported["map_by_bits"]) == ["4", "8", "16"]
    assert reported["map_by_bits"]["16"] == pytest.approx(reported["map"])
    checkpoint.with_suffix(".codes.npz").unlink()  # encode the checkpoint again, not the training's codes
    base = ["--dataset", "digits", "--subset", "200", "--device", "cpu", "--no_progress", "--output_dir", str(out),
            "--checkpoint", str(checkpoint), "--test"]
    tested = retrieval.main(retrieval.parse_args(base))  # the lengths come from the checkpoint
    assert tested["map_by_bits"] == pytest.approx(reported["map_by_bits"], abs=1e-9)
    assert "by bits: 4 " in capsys.readouterr().out
    for bits in (4, 8):
        alone = retrieval.main(retrieval.parse_args(base + ["--prefix_bits", str(bits)]))
        assert alone["map"] == pytest.approx(reported["map_by_bits"][str(bits)], abs=1e-9)
        assert alone["metrics"]["run"]["hash_bit"] == bits


def test_an_unlisted_prefix_is_tested_as_the_truncated_outputs_rank(nested_run):
    out, checkpoint, _ = nested_run
    model = load_checkpoint(checkpoint, device="cpu")
    splits = model.splits()
    query, database = (np.stack([split[i][0].numpy() for i in range(len(split))]) for split in
                       (splits.query, splits.database))
    with torch.no_grad():
        outputs = [model.network(torch.from_numpy(images)).numpy()[:, :5] for images in (query, database)]
    labels = [np.stack([split[i][1].numpy() for i in range(len(split))]) for split in (splits.query, splits.database)]
    expected = map_of_codes(CodeSet.from_outputs(outputs[0], labels[0], outputs[1], labels[1]), 200)
    tested = retrieval.main(retrieval.parse_args(
        ["--dataset", "digits", "--subset", "200", "--device", "cpu", "--no_progress", "--output_dir", str(out),
         "--checkpoint", str(checkpoint), "--test", "--prefix_bits", "5", "--retrieve", "200"]))
    assert tested["map"] == pytest.approx(expected, abs=1e-9)


def brute_force(query_signs, database_signs, k):
    """(distances, ids) of the k nearest database rows by Hamming distance, ties by index: a plain loop."""
    ranked = sorted((int(np.sum(row != query_signs)), index) for index, row in enumerate(database_signs))
    return [d for d, _ in ranked[:k]], [i for _, i in ranked[:k]]


def test_the_api_and_the_page_search_a_prefix_as_a_loop_over_truncated_codes(nested_run):
    _, checkpoint, _ = nested_run
    whole = load_checkpoint(checkpoint, device="cpu")
    model = load_checkpoint(checkpoint, device="cpu", bits=6)
    assert (model.hash_bit, model.nested_bits) == (6, [4, 8, 16])
    service = serve.SearchService.for_model(model)
    splits = service.splits
    full = whole.split_codes(splits)
    assert np.array_equal(model.encode(splits.query), prefix_bits(full.query_bits, 6))
    query_signs, database_signs = full.query_signs()[:, :6], full.database_signs()[:, :6]
    client = TestClient(serve.create_app(service), base_url="http://127.0.0.1:8000")
    for number in (3, 40):
        answer = client.get(f"/api/search?query_index={number}&k=15").json()
        assert answer["hash_bit"] == 6
        found = ([r["distance"] for r in answer["results"]], [r["id"] for r in answer["results"]])
        assert found == brute_force(query_signs[number], database_signs, 15)
    assert client.get("/api/run").json()["hash_bit"] == 6


@pytest.mark.parametrize("bits", [0, 17, 2.5, True])
def test_the_api_refuses_a_prefix_the_code_does_not_have(nested_run, bits):
    with pytest.raises(UserError, match="bits="):
        load_checkpoint(nested_run[1], device="cpu", bits=bits)


def test_a_harness_namespace_without_the_flag_builds_a_plain_loss():
    args = argparse.Namespace(**{**vars(retrieval.parse_args(["--loss", "csq", "--hash_bit", "16"]))})
    del args.nested_bits
    assert not isinstance(build_criterion(args, get_dataset_spec("digits")), NestedLoss)


def test_the_study_table_reads_nested_then_separate_and_sums_the_separate_times():
    from tests.cli_runs import load_script
    study = load_script("benchmarks/nested_study.py")
    options = study.get_args_parser().parse_args(["--datasets", "digits", "--losses", "csq", "--lengths", "8", "16"])
    results = {("digits", "csq", study.NESTED): ({8: 0.5, 16: 0.625}, 30.0),
               ("digits", "csq", 8): ({8: 0.25}, 10.0), ("digits", "csq", 16): None}
    row = study.render_dataset(options, "digits", results)[4]
    assert row == "| csq | 0.5000 / 0.2500 | 0.6250 / — | 30 / — |"
    results[("digits", "csq", 16)] = ({16: 0.75}, 12.0)
    row = study.render_dataset(options, "digits", results)[4]
    assert row == "| csq | 0.5000 / 0.2500 | 0.6250 / 0.7500 | 30 / 22 |"
    args = study.cell_args(options, "digits", "csq", study.NESTED)
    assert (args.hash_bit, args.nested_bits, args.loss) == (16, [8, 16], "csq")
    assert study.cell_args(options, "digits", "csq", 8).nested_bits is None


def test_query_with_a_prefix_ranks_as_a_loop_over_truncated_codes(nested_run):
    out, checkpoint, _ = nested_run
    full = load_checkpoint(checkpoint, device="cpu")
    codes = full.split_codes(full.splits())
    printed = retrieval.main(retrieval.parse_args(
        ["--dataset", "digits", "--subset", "200", "--device", "cpu", "--no_progress", "--output_dir", str(out),
         "--checkpoint", str(checkpoint), "--query", "digits:9", "--num_matches", "12", "--prefix_bits", "7"]))
    matches = printed["matches"][0]["matches"]
    found = ([m["distance"] for m in matches], [m["index"] for m in matches])
    assert found == brute_force(codes.query_signs()[9, :7], codes.database_signs()[:, :7], 12)


def test_a_prefix_longer_than_the_checkpoint_code_is_refused_naming_the_flag(nested_run, capsys):
    out, checkpoint, _ = nested_run
    code, _, err = exit_status(retrieval.cli, ["--dataset", "digits", "--device", "cpu", "--output_dir", str(out),
                                               "--checkpoint", str(checkpoint), "--test", "--prefix_bits", "17"],
                               capsys)
    assert code != 0 and "--prefix_bits 17" in err and "16 bits" in err
