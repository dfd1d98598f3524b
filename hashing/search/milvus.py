"""Packed binary codes in Milvus: one collection per checkpoint, searched by Hamming distance.

    from hashing.search.milvus import MilvusBackend

    backend = MilvusBackend(uri="result/codes.db", collection="hyp2_digits_small_48")  # Milvus Lite: a file
    backend = MilvusBackend(uri="http://HOST:19530", collection=NAME, token="user:pw")  # a server or cluster
    distances, ids = backend.search(query_bits, k=10)                    # the evaluator's order

The URI picks the engine (pymilvus's own rule): a path ending in .db is Milvus Lite, the engine embedded in a
Python package (milvus-lite 2.5.x; the 3.x line refuses binary vectors), which starts one server process per file;
http(s)://HOST:PORT is a Milvus server or cluster. A collection holds `id` (INT64 primary key: the database index),
`code` (BINARY_VECTOR of ceil(n / 8) * 8 bits: the packed code, padding bits 0), `labels` (VARCHAR: the class
indices, comma-separated) and `path` (VARCHAR: the image file, or "" for an in-memory dataset). Its description is
a JSON record of what it holds (the checkpoint's SHA-256, the bits, the source and its digest, the rows), which
hashing/search/export.py checks before writing to or reading from a collection: Milvus Lite keeps no collection
properties, and the description survives everywhere.

Index types: BIN_FLAT (exact, the default; the only one Milvus Lite builds) and BIN_IVF_FLAT (a Milvus server:
`nlist` clusters, `nprobe` searched, approximate). Milvus orders equal distances arbitrarily and, at the k-th
distance, keeps an arbitrary subset of the tied codes; search() therefore asks BIN_FLAT for more results until the
k-th distance's tie group is whole and returns the evaluator's order (distance, then id), so its answer equals
HammingIndex's to the last tie; search_raw() returns the engine's own answer (what `--verify` measures).
"""
import importlib
import itertools
import importlib.util
import json
import logging
import math
import re
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.paths import check_output_target, open_regular

from hashing.search.backend import SearchBackend, register_backend

RECORD_FORMAT = "hyp2-codes/1"
INDEX_TYPES = {"BIN_FLAT": True, "BIN_IVF_FLAT": False}  # index type -> exact
DEFAULT_NPROBE = 16
MAX_LIMIT = 16384  # Milvus's largest topk (and nq) per search
QUERY_ROWS = 256  # queries per search request
INSERT_ROWS = 1000  # rows per upsert request
MAX_BITS = 32768  # Milvus's largest BINARY_VECTOR
PATH_LENGTH = 4096  # the longest image path a collection stores (Linux's PATH_MAX)
CONNECT_TIMEOUT = 10.0
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_CONNECTIONS = itertools.count()
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://")
SQLITE_MAGIC = b"SQLite format 3\0"


def import_pymilvus():
    """The pymilvus module, quiet: its own error log lines would repeat what the UserError says."""
    try:
        with warnings.catch_warnings():  # milvus-lite imports pkg_resources, deprecated (setuptools < 81 is pinned)
            warnings.simplefilter("ignore", UserWarning)
            pymilvus = importlib.import_module("pymilvus")
            if importlib.util.find_spec("milvus_lite") is not None:  # imported now, its warning silenced
                importlib.import_module("milvus_lite")
    except ImportError:
        raise UserError("Milvus needs pymilvus and milvus-lite: pip install -r requirements.txt "
                        "(milvus-lite==2.5.1 pymilvus==2.5.18 'setuptools<81')") from None
    for name in ("pymilvus", "pymilvus.milvus_client"):  # pymilvus configures both
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


def pymilvus_available():
    return importlib.util.find_spec("pymilvus") is not None and importlib.util.find_spec("milvus_lite") is not None


def is_lite(uri):
    return not str(uri).startswith(SERVER_SCHEMES)


def check_uri(uri):
    """`uri` as pymilvus takes it, after checking it: a Milvus Lite file ending in .db (absent or a regular file,
    in an existing folder) or a server address."""
    uri = str(uri)
    if not is_lite(uri):
        return uri
    path = Path(uri)
    if path.suffix != ".db":
        raise UserError(f"--uri {uri}: a Milvus Lite database is a file ending in .db (or give a server: "
                        "http://HOST:19530)")
    if not path.parent.is_dir():
        raise UserError(f"--uri {uri}: its folder {path.parent} does not exist; create it or choose another file")
    check_output_target(path, "Milvus Lite database",
                        earlier_output=("a Milvus Lite database (SQLite)", _is_lite_file))
    return str(path.resolve())


def _is_lite_file(path):
    """Whether `path` is empty or an SQLite file (what Milvus Lite writes): any other file (a checkpoint named .db)
    is refused in one line naming it, where the engine would fail with "Open local milvus failed"."""
    with open_regular(path, "Milvus Lite database") as handle:
        return handle.read(len(SQLITE_MAGIC)) in (b"", SQLITE_MAGIC)


def collection_name(checkpoint):
    """The default collection of a checkpoint: hyp2_ and its file name's stem, other characters as _."""
    return ("hyp2_" + re.sub(r"[^A-Za-z0-9_]", "_", Path(checkpoint).stem))[:255]


def check_collection_name(name):
    if not NAME_PATTERN.fullmatch(name or ""):
        raise UserError(f"--collection {name!r}: a Milvus collection name is a letter or _ followed by up to 254 "
                        "letters, digits or _")
    return name


def engine_error(exc, uri, doing):
    return UserError(f"Milvus at {uri}: {doing} failed ({getattr(exc, 'message', None) or exc}); check --uri, "
                     "--token and that the server runs")


def connect(uri, token=None):
    """A MilvusClient of `uri` (checked); UserError when the engine cannot be reached."""
    pymilvus = import_pymilvus()
    uri = check_uri(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # a connection of its own: pymilvus shares one per URI, and closing a client would close the others'
            return pymilvus.MilvusClient(uri=uri, token=token or "", timeout=CONNECT_TIMEOUT,
                                         alias=f"hyp2-{next(_CONNECTIONS)}-{uri}")
    except Exception as exc:  # pymilvus raises MilvusException, grpc and OS errors alike
        raise engine_error(exc, uri, "connecting") from None


def ivf_nlist(rows):
    """BIN_IVF_FLAT's default number of clusters: about sqrt(rows), as hashing.search.index's ivf."""
    return int(min(65536, max(1, round(math.sqrt(max(rows, 1))))))


def _schema(pymilvus, record, label_length):
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                                 description=json.dumps(record, sort_keys=True))
    schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
    schema.add_field("code", pymilvus.DataType.BINARY_VECTOR, dim=-(-record["hash_bit"] // 8) * 8)
    schema.add_field("labels", pymilvus.DataType.VARCHAR, max_length=max(1, label_length))
    schema.add_field("path", pymilvus.DataType.VARCHAR, max_length=PATH_LENGTH)
    return schema


def _record_of(description, where):
    try:
        record = json.loads(description or "")
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or \
                not isinstance(record.get("hash_bit"), int) or not 1 <= record["hash_bit"] <= MAX_BITS:
            raise ValueError
        return record
    except ValueError:
        raise UserError(f"{where} was not written by hashing.export (its description is no record of codes); "
                        "pass another --collection") from None


@register_backend
class MilvusBackend(SearchBackend):
    """A Milvus collection of packed codes under int64 ids, searched as a HammingIndex is: search(queries, k) ->
    (distances int32 (Q, k'), ids int64 (Q, k')), search_radius, add(codes, ids), remove(ids), len(). Opens an
    existing collection (MilvusBackend.create makes one for an export). open_backend("milvus", hash_bit, uri=,
    collection=) opens it, or creates it empty when absent; without uri, in a temporary Milvus Lite file removed at
    close()."""
    name = "milvus"
    OPTIONS = {"uri": None, "collection": None, "token": None, "nprobe": DEFAULT_NPROBE}

    def __init__(self, hash_bit=None, uri=None, collection=None, token=None, nprobe=DEFAULT_NPROBE, client=None):
        self._temporary = None
        if uri is None:  # open_backend("milvus", bits): an empty Milvus Lite collection, gone when closed
            if hash_bit is None:
                raise UserError("the milvus search method needs uri= (FILE.db or http://HOST:19530) or hash_bit")
            self._temporary = tempfile.mkdtemp(prefix="hyp2-milvus-")
            weakref.finalize(self, shutil.rmtree, self._temporary, ignore_errors=True)  # also when never closed
            uri, collection = str(Path(self._temporary) / "codes.db"), collection or "codes"
        if collection is None:
            raise UserError(f"the milvus search method at {uri} needs collection=")
        self.uri, self.collection = str(uri), check_collection_name(collection)
        self.client = client if client is not None else connect(uri, token)
        self.nprobe = int(nprobe)
        try:
            if hash_bit is not None and not self._call("checking the collection", self.client.has_collection,
                                                       collection):  # asked for by bits: an empty one
                record = {"format": RECORD_FORMAT, "hash_bit": int(hash_bit), "source": "python", "rows": 0}
                self._call("creating the collection", _create_collection, import_pymilvus(), self.client,
                           collection, record, PATH_LENGTH, ("BIN_FLAT", 1, None))
            self._open(hash_bit)
        except UserError:
            self.close()  # Milvus Lite's server process stops with its last client
            raise

    def _open(self, hash_bit):
        if not self._call("checking the collection", self.client.has_collection, self.collection):
            raise UserError(f"Milvus at {self.uri} has no collection {self.collection}; write it first with python -m "
                            "hashing.export --to milvus")
        described = self._call("describing the collection", self.client.describe_collection, self.collection)
        self.record = _record_of(described.get("description"), f"collection {self.collection} at {self.uri}")
        if hash_bit is not None and int(hash_bit) != self.record["hash_bit"]:
            raise UserError(f"collection {self.collection} at {self.uri} holds {self.record['hash_bit']}-bit codes, "
                            f"not {hash_bit}-bit ones; pass another --collection")
        super().__init__(self.record["hash_bit"], uri=self.uri, collection=self.collection, nprobe=self.nprobe)
        self.index_type = self._index_type()
        self.exact = INDEX_TYPES.get(self.index_type, False)
        self._call("loading the collection", self.client.load_collection, self.collection)

    @classmethod
    def create(cls, uri, collection, record, label_length, token=None, index_type="BIN_FLAT", nlist=None,
               nprobe=DEFAULT_NPROBE, shards=None):
        """The collection `collection` at `uri` for `record` (format, checkpoint_sha256, hash_bit, source,
        source_sha256, rows): created when absent; when present, refused unless its record says the same
        checkpoint, bits and source (so that a resumed export continues its own collection)."""
        pymilvus, client = import_pymilvus(), connect(uri, token)
        record = {"format": RECORD_FORMAT, **record}
        try:
            if not client.has_collection(check_collection_name(collection)):
                _create_collection(pymilvus, client, collection, record, label_length,
                                   (index_type, nlist or ivf_nlist(record.get("rows", 1)), shards))
        except UserError:
            client.close()
            raise
        except Exception as exc:
            client.close()
            raise engine_error(exc, uri, f"creating collection {collection}") from None
        backend = cls(uri=uri, collection=collection, token=token, nprobe=nprobe, client=client)
        backend.check_record(record)
        return backend

    def check_record(self, expected, keys=("checkpoint_sha256", "hash_bit", "source", "source_sha256", "rows")):
        """UserError naming what differs when the collection's record is not `expected` on `keys`."""
        differs = [key for key in keys if key in expected and self.record.get(key) != expected[key]]
        if differs:
            self.close()
            raise UserError(f"collection {self.collection} at {self.uri} holds the codes of another "
                            f"{', '.join(differs)} ({', '.join(f'{k}={self.record.get(k)}' for k in differs)}); "
                            "pass another --collection, or drop that one to replace it (pymilvus: "
                            "MilvusClient(URI).drop_collection(NAME))")

    def _call(self, doing, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            raise engine_error(exc, self.uri, doing) from None

    def _index_type(self):
        names = self._call("listing the indexes", self.client.list_indexes, self.collection)
        for name in names:
            described = self._call("describing the index", self.client.describe_index, self.collection, name)
            if described.get("field_name") == "code":
                return described.get("index_type")
        raise UserError(f"collection {self.collection} at {self.uri} has no index on its codes; drop it and export "
                        "again")

    def __len__(self):
        return self.count()

    def count(self, condition=""):
        rows = self._call("counting", self.client.query, self.collection, filter=condition,
                          output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def done_prefix(self, rows):
        """The largest m <= rows such that ids 0..m-1 are all held: where an interrupted export resumes (the ids
        are the database indices, written in order; a later id written before an earlier one is rewritten)."""
        low, high = 0, min(rows, self.count(f"id >= 0 and id < {rows}"))
        if self.count(f"id < {high}") == high:
            return high
        while low < high:  # count(id < m) == m holds for every m up to the first gap, and for none after it
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.count(f"id < {middle}") == middle else (low, middle - 1)
        return low

    def add(self, codes, ids, labels=None, paths=None):
        """Upsert packed codes (N, ceil(hash_bit / 8)) uint8 under int64 `ids`, with their label strings and
        image paths ("" when not given): an id already held is replaced, never duplicated."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        ids = np.asarray(ids, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.code_bytes or len(codes) != len(ids):
            raise ValueError(f"add takes ({len(ids)}, {self.code_bytes}) packed codes, got {codes.shape}")
        labels = labels if labels is not None else [""] * len(ids)
        paths = paths if paths is not None else [""] * len(ids)
        too_long = next((path for path in paths if len(path.encode()) > PATH_LENGTH), None)
        if too_long is not None:
            raise UserError(f"image path {too_long[:80]}... is longer than the {PATH_LENGTH} bytes a collection "
                            "stores; move the images to a shorter path")
        for start in range(0, len(ids), INSERT_ROWS):
            rows = [{"id": int(ids[i]), "code": codes[i].tobytes(), "labels": labels[i], "path": paths[i]}
                    for i in range(start, min(len(ids), start + INSERT_ROWS))]
            self._call("inserting", self.client.upsert, self.collection, rows)

    def fetch(self, ids):
        """{id: (packed code, labels string, path)} of the `ids` held."""
        ids, held = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)], {}
        for start in range(0, len(ids), MAX_LIMIT):
            rows = self._call("reading rows", self.client.query, self.collection, ids=ids[start:start + MAX_LIMIT],
                              output_fields=["id", "code", "labels", "path"])
            held.update({row["id"]: (np.frombuffer(row["code"][0], np.uint8), row["labels"], row["path"])
                         for row in rows})
        return held

    def remove(self, ids):
        """Delete `ids`; returns how many of them were held."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        if not ids:
            return 0
        held = self._call("querying ids", self.client.query, self.collection, ids=ids, output_fields=["id"])
        if held:
            self._call("deleting", self.client.delete, self.collection, ids=[row["id"] for row in held])
        return len(held)

    def _engine_search(self, queries, limit):
        """[[(distance, id), ...] per query] as the engine answers, `limit` each."""
        params = {"metric_type": "HAMMING", "params": {"nprobe": self.nprobe} if not self.exact else {}}
        answers = []
        for start in range(0, len(queries), QUERY_ROWS):
            data = [row.tobytes() for row in queries[start:start + QUERY_ROWS]]
            found = self._call("searching", self.client.search, self.collection, data=data, limit=limit,
                               anns_field="code", search_params=params, output_fields=["id"])
            answers.extend([(int(round(hit["distance"])), int(hit["id"])) for hit in hits] for hits in found)
        return answers

    def _queries(self, queries, k):
        queries = np.ascontiguousarray(queries, dtype=np.uint8)
        if queries.ndim != 2 or queries.shape[1] != self.code_bytes:
            raise ValueError(f"queries must be (Q, {self.code_bytes}) packed codes, got {queries.shape}")
        if not 1 <= int(k) <= MAX_LIMIT:
            raise UserError(f"Milvus answers k from 1 to {MAX_LIMIT:,}, not {k}")
        return queries

    def search_raw(self, queries, k):
        """The engine's own answer: (distances, ids) of shape (Q, k), in its order; a short row is padded with id
        -1 at distance hash_bit + 1."""
        queries = self._queries(queries, k)
        return self._padded(self._engine_search(queries, int(k)), int(k))

    def search(self, queries, k):
        """(distances int32, ids int64) of shape (Q, min(k, len)) in the evaluator's order (distance, then id).
        With BIN_FLAT the k-th distance's tie group is fetched whole (up to MAX_LIMIT results a query, Milvus's
        cap), so the answer is HammingIndex's exactly."""
        queries, k = self._queries(queries, k), int(k)
        k = min(k, len(self))
        if k == 0 or len(queries) == 0:
            return np.zeros((len(queries), k), np.int32), np.zeros((len(queries), k), np.int64)
        answers = [sorted(answer) for answer in self._engine_search(queries, k)]
        if self.exact:
            answers = self._whole_tie_groups(queries, answers, k)
        return self._padded([answer[:k] for answer in answers], k)

    def _whole_tie_groups(self, queries, answers, k):
        """Ask again, with a larger limit, for the queries whose k-th distance may have tied codes left out."""
        limit = k
        while limit < MAX_LIMIT:
            cut = [q for q, answer in enumerate(answers) if len(answer) == limit and answer[k - 1][0] == answer[-1][0]]
            if not cut:
                break
            limit = min(MAX_LIMIT, limit * 4)
            for q, answer in zip(cut, self._engine_search(queries[cut], limit)):
                answers[q] = sorted(answer)
        return answers

    def search_radius(self, queries, radius):
        """[(distances int32, ids int64)] per query: every code within Hamming distance `radius`, in the evaluator's
        order (BIN_FLAT: all of them; UserError past MAX_LIMIT codes within the radius)."""
        queries = self._queries(queries, 1)
        held, results = len(self), []
        for query in queries:
            limit = min(held, 64)
            answer = sorted(self._engine_search(query[None], limit)[0]) if limit else []
            while len(answer) == limit < held and answer[-1][0] <= radius:
                if limit == MAX_LIMIT:
                    raise UserError(f"more than {MAX_LIMIT:,} codes lie within radius {radius}: Milvus answers at "
                                    f"most {MAX_LIMIT:,}; search a smaller radius")
                limit = min(held, MAX_LIMIT, limit * 4)
                answer = sorted(self._engine_search(query[None], limit)[0])
            kept = [(d, i) for d, i in answer if d <= radius]
            results.append((np.array([d for d, _ in kept], np.int32), np.array([i for _, i in kept], np.int64)))
        return results

    def _padded(self, answers, k):
        distances = np.full((len(answers), k), self.hash_bit + 1, dtype=np.int32)
        ids = np.full((len(answers), k), -1, dtype=np.int64)
        for q, answer in enumerate(answers):
            if answer:
                distances[q, :len(answer)], ids[q, :len(answer)] = zip(*answer)
        return distances, ids

    def close(self):
        try:
            self.client.close()
        except Exception:  # closing a client that failed to connect
            pass
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"MilvusBackend({self.uri!r}, {self.collection!r}, {self.index_type}, {self.hash_bit} bits)"


def _create_collection(pymilvus, client, collection, record, label_length, index):
    index_type, nlist, shards = index
    if index_type not in INDEX_TYPES:
        raise UserError(f"--milvus_index {index_type}: choose one of {', '.join(INDEX_TYPES)}")
    params = pymilvus.MilvusClient.prepare_index_params()
    params.add_index(field_name="code", index_type=index_type, metric_type="HAMMING",
                     params={"nlist": int(nlist)} if index_type == "BIN_IVF_FLAT" else {})
    extra = {"num_shards": int(shards)} if shards else {}
    try:
        client.create_collection(collection, schema=_schema(pymilvus, record, label_length), index_params=params,
                                 consistency_level="Strong", **extra)
    except Exception:
        if not client.has_collection(collection) or client.list_indexes(collection):
            raise
        client.drop_collection(collection)  # created, but the engine refused its index
        if index_type == "BIN_FLAT":
            raise
        raise UserError(f"--milvus_index {index_type}: this engine does not build it (Milvus Lite builds BIN_FLAT "
                        "only; BIN_IVF_FLAT needs a Milvus server, --uri http://HOST:19530)") from None
