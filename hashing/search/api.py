"""Search with a trained checkpoint from Python: load it, encode images to packed codes, index them.

    from hashing.search.api import load_checkpoint
    from hashing.search.index import HammingIndex

    model = load_checkpoint("result/digits_small_48.ckpt")   # network, dataset and class names of the run
    splits = model.splits()                                  # the run's own query and database splits
    index = HammingIndex.build(model.encode(splits.database))           # ids = database indices
    distances, ids = index.search(model.encode(["photo.jpg"]), k=10)   # the evaluator's order

A Milvus collection written by `python -m hashing.export` is searched the same way:
hashing.search.export.database_collection(model, "result/codes.db") returns its backend (search, search_radius).

load_checkpoint finds what a checkpoint needs to be rebuilt and used: the backbone a self-describing
checkpoint records, else the run's log next to it (OUTPUT_DIR/{run}.jsonl, .metrics.json: dataset, backbone,
bits, heads, data settings), else the arguments given. encode takes image files, a folder, PIL images or a
dataset split (items (image tensor, labels), e.g. one of model.splits()) and returns the packed codes of
hashing/codes.py, which HammingIndex (hashing/search/index.py) searches in the evaluator's tie order. An image file
that is missing or is no JPEG, PNG, WebP, BMP, GIF or TIFF image raises hashing.search.api.UnreadableImage (a
utils.errors.UserError, whose message names the file); every other mistake a UserError.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.base import DataOptions, UnreadableImage, split_labels
from data.fingerprint import split_fingerprint
from data.registry import build_splits, get_dataset_spec
from data.transforms import image_transform
from network import DEFAULT_BACKBONE, OutputPrefix, build_network, file_label, get_backbone, head_outputs
from utils.checkpoint import (check_network_settings, check_weights_fit, load_network_weights, read_backbone_record,
                              require_checkpoint_file)
from utils.device import select_device
from utils.documents import MAX_METRICS_BYTES, read_json_file
from utils.errors import UserError
from utils.runlog import progress_bar, read_run_log

from hashing import cache
from hashing.codes import CodeSet, NonFiniteCodes, pack_labels, pack_signs
from hashing.feature_cache import CacheSettings, cached_features
from hashing.search.stream import ImageItems, encode_to_file, image_paths

__all__ = ["CheckpointModel", "UnreadableImage", "UserError", "load_checkpoint"]

# The run's data settings that decide its splits, with the defaults of a run that does not record them.
DATA_SETTINGS = {"data_root": "./data", "seed": 0, "subset": 0}  # the data options: DataOptions.from_flags
API_HINT = "Pass the backbone, hash_bit and experts it was trained with."
CLI_HINT = "Pass the --backbone and --hash_bit it was trained with (and --experts for a multi-head checkpoint)."


@dataclass
class CheckpointModel:
    """A trained hash network ready to encode, with what its run says about it."""
    network: torch.nn.Module  # in eval mode, on `device`
    backbone: object  # network.BackboneSpec
    hash_bit: int  # the length of the codes it gives: the network's, or the prefix load_checkpoint(bits=) chose
    checkpoint: Path
    device: torch.device
    dataset: str = None  # --dataset of the run, when known
    class_names: tuple = None
    run: dict = field(default_factory=dict)  # the run's flags (its event log's "args"), when found
    metrics: dict = None  # its .metrics.json, when found
    nested_bits: list = None  # the prefix lengths a nested run trained (docs/METHOD.md §14), when recorded

    @property
    def transform(self):
        """PIL image -> normalised tensor, as the backbone's evaluation inputs."""
        return image_transform(self.backbone.preprocessing, train=False)

    def encode(self, images, batch_size=64, feature_cache=None):
        """Packed codes (N, ceil(hash_bit / 8)) uint8 of `images`: image paths, a folder, PIL images, one
        image path or PIL image (one row), or a dataset split whose items are (image tensor, labels).
        feature_cache: a folder where a split's trunk features are cached (hashing/feature_cache.py, as
        --feature_cache): computed once, then only the hash head runs."""
        if feature_cache is not None:
            outputs = self._outputs_from_features(images, batch_size, feature_cache)
        else:
            loader = DataLoader(_as_dataset(images, self.transform), batch_size=batch_size, shuffle=False)
            outputs = []
            with torch.inference_mode():
                for batch in progress_bar(loader, desc="encode", unit="batch"):
                    pixels = batch[0] if isinstance(batch, (list, tuple)) else batch
                    outputs.append(self.network(pixels.to(self.device)).float().cpu().numpy())
        outputs = np.concatenate(outputs) if outputs else np.zeros((0, self.hash_bit), np.float32)
        if not np.isfinite(outputs).all():
            raise NonFiniteCodes(f"{self.checkpoint} gives NaN or infinite outputs")
        return pack_signs(outputs)

    def _outputs_from_features(self, split, batch_size, folder):
        """The network's outputs of a dataset split, batch by batch, from its cached trunk features."""
        if not isinstance(split, Dataset):
            raise UserError("feature_cache= caches the features of a dataset split (e.g. one of model.splits()); "
                            "encode image files without it")
        name = f"{self.dataset or 'split'}_{file_label(self.backbone.name)}"
        prefix = self.network.bits if isinstance(self.network, OutputPrefix) else None  # load_checkpoint(bits=)
        network = self.network.network if prefix else self.network
        features = cached_features(network, self.backbone.hash_layer, split, name,
                                   CacheSettings(Path(folder), batch_size=batch_size, device=self.device)).features
        with torch.inference_mode():
            return [head_outputs(network, self.backbone.hash_layer,
                                 torch.from_numpy(np.array(features[start:start + batch_size], dtype=np.float32))
                                 .to(self.device))[..., :prefix].float().cpu().numpy()
                    for start in range(0, len(features), batch_size)]

    def encode_to_file(self, images, output, batch_size=64):
        """Encode a large collection (a folder or image paths) into a memory-mapped code file, resumably
        (hashing/search/stream.py); returns its EncodedImages (codes, paths, hash_bit)."""
        return encode_to_file(self.network, images, self.transform, output, batch_size=batch_size, device=self.device,
                              inputs=[("the checkpoint", self.checkpoint)])

    def data_settings(self, data_root=None):
        settings = {**self.run, **{name: self.run.get(name, default) for name, default in DATA_SETTINGS.items()}}
        if data_root is not None:
            settings["data_root"] = str(data_root)
        return settings

    def splits(self, data_root=None):
        """The run's train, query and database splits (RetrievalSplits), as the run built them, with the
        backbone's evaluation preprocessing; `data_root` overrides the run's."""
        if self.dataset is None:
            raise UserError(f"{self.checkpoint}: no run log next to it says which dataset it was trained on; pass "
                            "dataset= (--dataset)")
        settings = self.data_settings(data_root)
        try:
            return build_splits(self.dataset, settings["data_root"], settings["seed"], self.backbone.preprocessing,
                                DataOptions.from_flags(settings), settings["subset"])
        except (ValueError, NotImplementedError) as exc:
            raise UserError(f"--dataset {self.dataset} under {settings['data_root']}: {exc}") from None

    def cached_codes(self, splits):
        """The CodeSet of the run's codes cache ({run}.codes.npz) when it was computed from this checkpoint's
        bytes and from these splits as they are now (their content digests in its key, as --test checks), else
        None."""
        stored = cache.read(self.checkpoint.with_suffix(".codes.npz"))
        if stored is None:
            return None
        codes, key = stored
        if codes.hash_bit < self.hash_bit:
            return None
        codes = codes.prefix(self.hash_bit)  # the cache holds the whole codes
        expected = {"checkpoint_sha256": cache.file_sha256(self.checkpoint),
                    "query": split_fingerprint(splits.query), "database": split_fingerprint(splits.database)}
        if any(key.get(name) != value for name, value in expected.items()):
            return None
        return codes if (len(codes.query_bits), len(codes.database_bits)) == \
            (len(splits.query), len(splits.database)) else None

    def split_codes(self, splits):
        """The CodeSet of `splits`' query and database: the run's cache when it fits them, else encoded."""
        cached = self.cached_codes(splits)
        if cached is not None:
            return cached
        query_labels, database_labels = (split_labels(split).numpy() for split in (splits.query, splits.database))
        return CodeSet(self.encode(splits.query), pack_labels(query_labels), self.encode(splits.database),
                       pack_labels(database_labels), self.hash_bit, query_labels.shape[1])


def _as_dataset(images, transform):
    """Images to encode: a dataset as it is; a folder's images; one path or PIL image as a list of one."""
    if isinstance(images, Dataset):
        return images
    if isinstance(images, (str, Path)):
        images = image_paths(images) if Path(images).is_dir() else [images]
    elif isinstance(images, Image.Image):
        images = [images]
    return ImageItems(list(images), transform, hint="pass a PNG or JPEG image")


def run_record(checkpoint):
    """({run flags}, metrics or None) from the run's files next to `checkpoint` (OUTPUT_DIR/{run}.jsonl and
    .metrics.json); empty when there are none or they are unreadable."""
    args, metrics = {}, None
    log = checkpoint.with_suffix(".jsonl")
    if log.is_file():
        try:
            args = read_run_log(log).get("args") or {}
        except (OSError, ValueError, UserError):
            args = {}
    metrics_file = checkpoint.with_suffix(".metrics.json")
    if metrics_file.is_file():
        try:
            metrics = read_json_file(metrics_file, "metrics file", MAX_METRICS_BYTES)
        except UserError:
            metrics = None
    if not args and isinstance(metrics, dict) and isinstance(metrics.get("run"), dict):
        args = dict(metrics["run"])  # no log: the metrics file names the dataset, backbone and bits
    return (args if isinstance(args, dict) else {}), (metrics if isinstance(metrics, dict) else None)


def _given_contradicts(checkpoint, name, value, known, cli):
    if cli:
        return UserError(f"--{name} {value} contradicts --checkpoint {checkpoint}, whose network has {name} {known}: "
                         f"drop --{name} (the checkpoint says it) or pass the right checkpoint")
    return UserError(f"{name}={value} contradicts {checkpoint}, whose run has {name} {known}")


def resolve_network(checkpoint, given, defaults=None, cli=False):
    """How to rebuild the network of `checkpoint`: (settings {dataset, backbone, input_size, hash_bit, experts,
    inference_head}, its BackboneSpec, the run's flags, its metrics). Each setting comes from the checkpoint's own
    record (self-describing backbones), else its run's files (run_record), else `given` (None: not given), else
    `defaults`; a given value that contradicts the checkpoint is a UserError (worded for flags with `cli`). The
    values are checked (types, bounds) and the network they describe is compared with the weights' shapes before
    anything is built. The API, the search server and retrieval.py (--test, --query, --export_index) use it."""
    checkpoint = Path(checkpoint)
    run, metrics = run_record(checkpoint)
    check_network_settings(run, f"the run log of {checkpoint}")
    check_network_settings(given, "the arguments", "pass an integer within the bounds")
    record = read_backbone_record(checkpoint) or {}
    known = {"dataset": run.get("dataset"), "backbone": record.get("name") or run.get("backbone"),
             "input_size": record.get("input_size") or run.get("input_size"),
             "hash_bit": record.get("hash_bit") or run.get("hash_bit"),
             "experts": record.get("experts") or run.get("experts"), "inference_head": run.get("inference_head"),
             "nested_bits": record.get("nested_bits") or run.get("nested_bits")}
    for name, value in given.items():
        if value is not None and known[name] is not None and str(value) != str(known[name]):
            raise _given_contradicts(checkpoint, name, value, known[name], cli)
    settings = {name: next((value for value in (given.get(name), known[name], (defaults or {}).get(name))
                            if value is not None), None) for name in known}
    if settings["hash_bit"] is None:
        raise UserError(f"{checkpoint}: neither the checkpoint nor a run log next to it says its number of bits; "
                        "pass hash_bit= (--hash_bit)")
    settings["experts"] = settings["experts"] or 1
    check_nested_bits(checkpoint, known["nested_bits"], settings["hash_bit"])  # given ones: the caller checks
    try:
        spec = get_backbone(settings["backbone"] or DEFAULT_BACKBONE, settings["input_size"])
    except ValueError as exc:
        raise UserError(f"{checkpoint}: {exc}") from None
    check_weights_fit(checkpoint, spec, settings["hash_bit"], settings["experts"],
                      hint=CLI_HINT if cli else API_HINT)
    return settings, spec, run, metrics


def check_nested_bits(checkpoint, lengths, hash_bit):
    """UserError unless the recorded nested lengths (None: none) ascend from 1 to the code's length."""
    if lengths is None:
        return
    if not isinstance(lengths, list) or not all(isinstance(bits, int) and not isinstance(bits, bool)
                                                 for bits in lengths) \
            or not lengths or lengths != sorted(set(lengths)) or lengths[0] < 1 or lengths[-1] != hash_bit:
        raise UserError(f"{checkpoint}: its nested_bits {lengths!r} are not ascending lengths ending at its "
                        f"{hash_bit} bits; it is damaged or not of this tool")


def code_length(checkpoint, bits, hash_bit):
    """The code length `bits` to search with (None: all `hash_bit`), checked: an integer from 1 to hash_bit."""
    if bits is None:
        return hash_bit
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= hash_bit:
        raise UserError(f"bits={bits!r}: {checkpoint} gives codes of {hash_bit} bits; pass an integer from 1 to "
                        f"{hash_bit} (a prefix of the code)")
    return bits


def load_checkpoint(path, dataset=None, backbone=None, hash_bit=None, experts=None, inference_head=None,
                    device="auto", bits=None):
    """The CheckpointModel of the checkpoint at `path`. What rebuilds its network comes from the checkpoint's
    own record (self-describing backbones), else from its run's files, else from the arguments (as the
    flags of the same names): resolve_network; an argument that contradicts the checkpoint is a UserError.
    `bits` b: encode and search with the first b bits of every code (a nested run's b-bit code, §14)."""
    checkpoint = Path(path)
    require_checkpoint_file(checkpoint)
    given = {"dataset": dataset, "backbone": backbone, "hash_bit": hash_bit, "experts": experts,
             "inference_head": inference_head}
    settings, spec, run, metrics = resolve_network(checkpoint, given)
    head = settings["inference_head"]
    head = int(head) if isinstance(head, str) and head.isdigit() else (head if head is not None else 0)
    network = build_network(spec, settings["hash_bit"], experts=settings["experts"], inference_head=head)
    load_network_weights(network, checkpoint, hint=API_HINT)
    bits = code_length(checkpoint, bits, settings["hash_bit"])
    network = network if bits == settings["hash_bit"] else OutputPrefix(network, bits)
    chosen = select_device(device) if isinstance(device, str) else device
    class_names = None
    if settings["dataset"] is not None:
        try:
            class_names = get_dataset_spec(settings["dataset"]).class_names
        except ValueError as exc:
            raise UserError(f"{checkpoint}: {exc}") from None
    return CheckpointModel(network.to(chosen).eval(), spec, bits, checkpoint, chosen, settings["dataset"],
                           class_names, run, metrics, settings["nested_bits"])
