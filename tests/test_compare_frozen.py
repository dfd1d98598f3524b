"""benchmarks/compare.py --feature_cache DIR: the losses as heads on cached frozen-trunk features and the shallow
hashers on the same features, in one table that says which rows trained."""
import csv

import pytest

from tests.cli_runs import load_script
from utils.errors import UserError
from utils.runlog import read_run_log

compare = load_script("benchmarks/compare.py")


def test_losses_as_heads_and_shallow_hashers_share_one_feature_cache_and_one_table(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "features"
    summary = compare.main(["--losses", "hyp2", "--hashers", "lsh", "itq", "--bits", "8", "--seeds", "0",
                            "--epochs", "1", "--subset", "40", "--device", "cpu", "--output_dir", str(out),
                            "--feature_cache", str(cache), "--batch_size", "20"])
    assert summary["trained"] == 3 and not summary["failed"]
    root = out / "compare_digits_small"
    head = read_run_log(root / "hyp2_8bit_seed0" / "digits_small_8.jsonl")
    itq = read_run_log(root / "itq_8bit_seed0" / "digits_small_8_itq.jsonl")
    assert head["args"]["freeze_backbone"] and head["args"]["feature_cache"] == str(cache)
    assert itq["trained"] is False and itq["hasher"]["hasher"] == "itq"
    # one trunk, one cache: the three runs read the same train/query/database files
    files = sorted(path.name.split("-")[0] for path in cache.glob("*.npy"))
    assert files == ["digits_small_query", "digits_small_train"]  # digits' database is the training images

    with open(out / "compare_digits_small.csv") as handle:
        rows = {row["loss"]: row for row in csv.DictReader(handle)}
    assert {name: row["trained"] for name, row in rows.items()} == {
        "hyp2": "yes (head only)", "lsh": "no (fit only)", "itq": "no (fit only)"}
    assert float(rows["itq"]["map_mean"]) == pytest.approx(itq["test_map"])
    table = (out / "compare_digits_small.md").read_text()
    assert "| loss | trained | 8 bits |" in table
    assert "| itq | no (fit only) | " in table and "| hyp2 | yes (head only) | " in table
    assert "the shallow hashers (lsh, itq) are fitted on the training split's features" in table


def test_hashers_without_a_frozen_trunk_are_refused(tmp_path):
    with pytest.raises(UserError, match="add --freeze_backbone"):
        compare.main(["--losses", "hyp2", "--hashers", "lsh", "--bits", "8", "--seeds", "0",
                      "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="may not be given --hasher"):
        compare.main(["--losses", "hyp2", "--hasher", "lsh", "--output_dir", str(tmp_path)])


def test_the_frozen_features_study_puts_end_to_end_heads_and_hashers_in_one_table(tmp_path):
    study = load_script("benchmarks/frozen_features_study.py")
    rows = study.main(["--losses", "dpsh", "--hashers", "pcah", "--bits", "8", "--epochs", "1", "--subset", "40",
                       "--output_dir", str(tmp_path), "--batch_size", "20", "--device", "cpu"])
    kinds = [(kind, name, len(values[8])) for kind, name, _, values in rows]
    assert kinds == [("end_to_end", "dpsh", 1), ("head", "dpsh", 1), ("hasher", "pcah", 1)]
    trunk = tmp_path / "end_to_end" / "compare_digits_small" / "hyp2_8bit_seed0" / "digits_small_8.ckpt"
    assert trunk.is_file()  # the trunk loss (hyp2) trains end to end even when --losses leaves it out
    head = read_run_log(tmp_path / "frozen_seed0" / "compare_digits_small" / "dpsh_8bit_seed0" /
                        "digits_small_8_dpsh.jsonl")
    assert head["args"]["trunk_from"] == str(trunk) and head["args"]["freeze_backbone"]
    table = (tmp_path / "frozen_features_digits.md").read_text()
    assert "| pcah | hasher | no (fit only, frozen trunk) | " in table and "| dpsh | end-to-end | yes (whole" in table
