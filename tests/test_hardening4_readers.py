"""Issue 30, items 5, 8 and 9: every JSON/YAML file a run reads back goes through one reader with a size cap and a
nesting limit; index options are validated with bounds; recipe values keep every digit and never become flags."""
import json
import os
import shutil
import struct

import numpy as np
import pytest

import retrieval
from benchmarks import plot_compare
from data.flickr import read_saved_order
from data.image_cache import ImageCache, truncated_list_for
from hashing import cache as codes_cache
from hashing.search import stream
from hashing.search.api import run_record
from hashing.codes import CodeSet
from hashing.search.index import ALIGNMENT, MAGIC, HammingIndex
from tests.cli_runs import SMALL_DIGITS_RUN, exit_status
from tests.cli_runs import run_small_digits as run
from tests.test_hardening_evaluate import deadline, small_problem
from utils.config import parse_args_with_config, read_config
from utils.documents import MAX_NESTING, nesting_depth, parse_json, read_json_file
from utils.errors import UserError
from utils.documents import holds_json_object_with
from utils.runlog import MAX_EVENT_BYTES, read_run_log

HOSTILE = "[" * 100_000  # one line of this in RUN.jsonl ended --test, hashing.serve and plot_compare


def depth_by_parsing(value):
    """The nesting depth of a parsed JSON value, computed by walking it (the independent count)."""
    if isinstance(value, list):
        return 1 + max((depth_by_parsing(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_by_parsing(item) for item in value.values()), default=0)
    return 0


def random_document(rng, depth):
    """A JSON value nested `depth` deep whose strings hold brackets, quotes and backslashes."""
    if depth == 0:
        return rng.choice(["[{", '"]}\\', "\\", 3, None, '\\"['])
    inner = [random_document(rng, depth - 1)] + [random_document(rng, 0) for _ in range(rng.integers(0, 3))]
    return inner if rng.random() < 0.5 else {f"k{i}[\"": item for i, item in enumerate(inner)}


# ============ item 5: one reader, a size cap and a nesting limit ============

def test_the_depth_scan_agrees_with_walking_the_parsed_value():
    rng = np.random.default_rng(5)
    for _ in range(200):
        document = random_document(rng, int(rng.integers(0, 12)))
        text = json.dumps(document, indent=int(rng.integers(0, 2)) or None)
        assert nesting_depth(text) == depth_by_parsing(json.loads(text)), text
    assert nesting_depth(HOSTILE) == 100_000
    assert nesting_depth('"\\\\"[[') == 2 and nesting_depth('"\\"[["') == 0  # an escaped backslash ends no string


def test_hostile_nesting_is_a_one_line_error_not_a_recursion_error(tmp_path):
    with pytest.raises(UserError, match="nests 100,000 levels deep"):
        parse_json(HOSTILE, "thing")
    path = tmp_path / "x.json"
    path.write_text("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1))
    with pytest.raises(UserError, match=f"{path}.* nests {MAX_NESTING + 1} levels"):
        read_json_file(path, "the file", 1 << 20)
    path.write_text("[" * MAX_NESTING + "]" * MAX_NESTING)
    assert depth_by_parsing(read_json_file(path, "the file", 1 << 20)) == MAX_NESTING
    os.truncate(path, 2 << 20)
    with pytest.raises(UserError, match="MiB"):
        read_json_file(path, "the file", 1 << 20)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(UserError, match="FIFO"):
        read_json_file(fifo, "the file", 1 << 20)
    path.write_text("{")
    with pytest.raises(UserError, match=r"is unreadable \(not JSON"):
        read_json_file(path, "the file", 1 << 20)
    assert not holds_json_object_with(tmp_path / "hostile.json", ["a"])
    (tmp_path / "hostile.json").write_text(HOSTILE)
    assert not holds_json_object_with(tmp_path / "hostile.json", ["a"])


def event_log(path, *lines):
    start = {"event": "start", "args": {"dataset": "digits"}}
    epoch = {"event": "epoch", "epoch": 1, "map": 0.5, "train_seconds": 1.0}
    path.write_text("\n".join([json.dumps(start), *lines, json.dumps(epoch), ""]))
    return path


def test_the_run_log_skips_hostile_and_overlong_lines_and_keeps_the_rest(tmp_path):
    for line in (HOSTILE, "[" * (MAX_EVENT_BYTES + 10), "{" + " " * MAX_EVENT_BYTES + "}", '{"a": 1}' + "x" * 50):
        record = read_run_log(event_log(tmp_path / "run.jsonl", line))
        assert record["args"] == {"dataset": "digits"} and [e["epoch"] for e in record["epochs"]] == [1]
    big = tmp_path / "big.jsonl"
    big.write_text("")
    os.truncate(big, 65 << 20)  # a sparse file: the cap is checked before anything is read
    with deadline(10), pytest.raises(UserError, match="MiB"):
        read_run_log(big)


def test_the_search_api_and_plot_compare_survive_hostile_run_files(tmp_path):
    event_log(tmp_path / "run.jsonl", HOSTILE)
    (tmp_path / "run.metrics.json").write_text(HOSTILE)
    args, metrics = run_record(tmp_path / "run.ckpt")  # what hashing.serve shows of a run
    assert args == {"dataset": "digits"} and metrics is None
    prefix, metrics, log = plot_compare.load_run(tmp_path / "run.metrics.json")
    assert metrics is None and [e["epoch"] for e in log["epochs"]] == [1]


def test_a_damaged_codes_cache_key_means_re_encode(tmp_path):
    path = tmp_path / "run.codes.npz"
    codes = CodeSet.from_outputs(*small_problem())
    codes_cache.save(path, codes, {"k": 1})
    assert codes_cache.read(path)[1] == {"k": 1}
    for key in (HOSTILE, "{", "x" * (2 << 20)):
        np.savez(path, key=np.array(key), **codes.stored_arrays())
        assert codes_cache.read(path) is None
        assert codes_cache.load(path, {"k": 1}) is None


def test_a_hostile_index_header_is_refused_as_damaged(tmp_path):
    path = tmp_path / "db.index"
    HammingIndex.build(np.random.default_rng(12).integers(0, 256, (10, 8), dtype=np.uint8)).save(path)
    header = HOSTILE[:60_000].encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(header)) + header)
    with pytest.raises(UserError, match="index file .* nests 60,000 levels deep"):
        HammingIndex.load(path)


def test_hostile_progress_record_truncated_list_and_saved_split_are_one_line_errors(tmp_path):
    record = tmp_path / "codes.npy.progress.json"
    record.write_text(HOSTILE)
    with pytest.raises(UserError, match="progress record .* nests"):
        stream._read_record(record)
    split = tmp_path / "split.json"
    split.write_text(HOSTILE)
    with pytest.raises(UserError, match="split.json is unreadable .it nests .* delete it to draw it again"):
        read_saved_order(split)
    cache_file = tmp_path / "images_8px_abc.npy"
    truncated_list_for(cache_file).write_text(HOSTILE)
    with pytest.raises(UserError, match="truncated images .* nests"):  # open_or_build then builds the cache again
        ImageCache(cache_file, [str(tmp_path / "a.png")], 8).read_truncated()


READERS = {  # each reader of a JSON file read back, and what it does with a file it refuses
    "progress record": lambda path: stream._read_record(path),
    "saved split": read_saved_order,
    "truncated images": lambda path: ImageCache(path.with_suffix("").with_suffix(".npy"), [], 8).read_truncated(),
}


@pytest.mark.parametrize("reader", READERS)
def test_each_json_reader_refuses_an_oversized_file_and_a_fifo_without_blocking(tmp_path, reader):
    path = tmp_path / "cache.truncated.json"
    path.write_text("")
    os.truncate(path, 65 << 20)  # over every cap (sparse: nothing is written, and nothing is read)
    with deadline(10), pytest.raises(UserError, match="MiB"):
        READERS[reader](path)
    path.unlink()
    os.mkfifo(path)
    with deadline(10), pytest.raises((UserError, ValueError), match="FIFO|is missing"):  # both: open_or_build rebuilds
        READERS[reader](path)


def test_hostile_recipe_files_are_one_line_errors(tmp_path):
    path = tmp_path / "recipe.yaml"
    for text in (f"epochs: {HOSTILE}\n", "epochs:\n" + "".join(" " * i + "- \n" for i in range(1, 1200))):
        path.write_text(text)
        with pytest.raises(UserError, match="recipe file .* nests"):
            read_config(path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return out, run(["--epochs", "1", "--output_dir", str(out)])


def test_test_and_plot_compare_run_with_a_hostile_line_in_the_run_log(trained_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained_run[0], out)
    log = out / "digits_small_16.jsonl"
    log.write_text(log.read_text() + HOSTILE + "\n")
    with deadline(120):
        code, printed, _ = exit_status(retrieval.cli, SMALL_DIGITS_RUN + ["--test", "--output_dir", str(out)], capsys)
    assert code == 0 and f"mAP@200: {trained_run[1]['map']:.4f}" in printed
    (out / "digits_small_16.metrics.json").write_text(HOSTILE)
    written = plot_compare.main([str(log), "--out", str(tmp_path / "compare")])
    assert [path.name for path in written] == ["compare.convergence.png"]


# ============ item 8: an index file's options are data, validated with bounds ============

def index_with_options(path, method, **options):
    """A saved 100-code index at `path` whose header names `method` with `options` (as a crafted file would)."""
    HammingIndex.build(np.random.default_rng(8).integers(0, 256, (100, 6), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    length = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])[0]
    header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + length])
    text = json.dumps({**header, "method": method, "options": options}).encode()
    text += b" " * (-(len(MAGIC) + 4 + len(text)) % ALIGNMENT)
    path.write_bytes(MAGIC + struct.pack("<I", len(text)) + text + data[len(MAGIC) + 4 + length:])
    return path


@pytest.mark.parametrize("method, options, named", [
    ("hnsw", {"neighbors": 1_000_000}, "neighbors"),  # took 15.3 GB and 73 s
    ("hnsw", {"neighbors": 1}, "neighbors"),
    ("hnsw", {"ef_search": -1}, "ef_search"),  # returned ids of -1 silently
    ("hnsw", {"ef_construction": 10 ** 9}, "ef_construction"),
    ("hnsw", {"ef_search": 12.5}, "ef_search"),
    ("ivf", {"nlist": 10 ** 9}, "nlist"),  # a MemoryError
    ("ivf", {"nlist": 0}, "nlist"),
    ("ivf", {"nprobe": -3}, "nprobe"),
    ("ivf", {"seed": 2 ** 40}, "seed"),
    ("ivf", {"nprobe": True}, "nprobe"),
    ("mih", {"substrings": 10 ** 6}, "substrings"),
    ("mih", {"substrings": "4"}, "substrings"),
    ("flat", {"use_faiss": "yes"}, "use_faiss"),
])
def test_index_options_out_of_bounds_are_refused_before_anything_is_built(tmp_path, method, options, named):
    path = index_with_options(tmp_path / "db.index", method, **options)
    with deadline(10), pytest.raises(UserError, match=f"index file {path} .*option {named} ") as error:
        HammingIndex.load(path)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=f"option {named} "):  # the same rule for an index built in code
        HammingIndex(48, method, **options)


def test_index_options_within_bounds_load_and_search_like_brute_force(tmp_path):
    path = index_with_options(tmp_path / "db.index", "hnsw", neighbors=64, ef_construction=200, ef_search=512)
    index = HammingIndex.load(path)
    assert index.options == {"neighbors": 64, "ef_construction": 200, "ef_search": 512}
    codes = np.unpackbits(index.codes, axis=1)
    distances, ids = index.search(index.codes[:5], 3)
    brute = np.sort((codes[:5, None, :] != codes[None, :, :]).sum(-1), axis=1)[:, :3]
    assert np.array_equal(distances, brute) and (ids >= 0).all()  # 100 codes, ef_search 512: the walk is exact
    ivf = HammingIndex.load(index_with_options(tmp_path / "ivf.index", "ivf", nlist=10, nprobe=10, seed=3))
    assert np.array_equal(ivf.search(ivf.codes[:5], 3)[0], brute)  # every cluster probed: exact


# ============ item 9: recipe files ============

def parse_recipe(tmp_path, text, argv=()):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    return parse_args_with_config(retrieval.get_args_parser(), ["--config", str(recipe), *argv])


def test_recipe_floats_keep_every_digit(tmp_path):
    for value in (0.000123456789, 1234567.0, 0.1 + 0.2, 1e-300, 2.5e16):
        args = parse_recipe(tmp_path, f"lr: {value!r}\n")
        assert args.lr == value  # `:g` gave 0.000123457, 1.23457e+06, 0.3, ...
    assert parse_recipe(tmp_path, "epochs: 3.0\n").epochs == 3  # an integral float still sets an integer flag


@pytest.mark.parametrize("text", ['epochs: [1, "--overwrite"]\n', 'top_n: [10, "--overwrite"]\n',
                                  'top_n: [10, "-h"]\n'])
def test_a_recipe_list_cannot_smuggle_a_flag(tmp_path, text):
    with pytest.raises(UserError, match="recipe|--config") as error:
        parse_recipe(tmp_path, text)
    assert "\n" not in str(error.value) and "recipe.yaml" in str(error.value)


def test_a_recipe_value_that_starts_with_a_dash_is_a_value(tmp_path):
    args = parse_recipe(tmp_path, 'output_dir: "--overwrite"\ndata_root: "-x"\n')
    assert args.output_dir == "--overwrite" and args.data_root == "-x" and not args.overwrite
    assert parse_recipe(tmp_path, "top_n: [5, 10]\n").top_n == [5, 10]
