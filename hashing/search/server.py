"""A search page for a trained checkpoint: pick a query of the run's query split or upload an image, and see
the top-k database items with their Hamming distances, labels and relevance.

    python -m hashing.serve --checkpoint result/digits_small_48.ckpt            # http://127.0.0.1:8000
    python -m hashing.serve --checkpoint CKPT --data_root /data --port 8080 --k 20
    python -m hashing.serve --checkpoint CKPT --index milvus:result/codes.db   # the collection hashing.export wrote

The dataset, backbone and bits come from the checkpoint and its run's files (hashing/api.load_checkpoint);
--data_root where the data lies elsewhere than the run said. The JSON API:

    GET  /api/search?query_index=N&k=K    the N-th image of the query split
    POST /api/search                      multipart form: image=<file> (and k=K)
    GET  /api/run                         the run: dataset, backbone, bits, mAP and its convention, figures

answers {"results": [{"id", "distance", "labels", "relevant"}, ...], ...} in rank order: ids are database
indices, the order is the evaluator's (distance, then index), as --query prints it.

Safe by default (README, Threat model): it binds 127.0.0.1 (--host to change it, with a warning) and answers only
requests addressed to a name it listens as (no DNS rebinding) and POSTs from its own page (Origin,
Sec-Fetch-Site); images are served by index and figures only from the run's regular files (no part of a request
names a file); uploads are decoded (data.files.decode_image: the project's formats only) and encoded off the event
loop in DECODE_SLOTS threads, at most MAX_UPLOADS at once, and capped in bytes and pixels; a body is capped in
bytes and seconds while it streams, a connection gets HEADER_TIMEOUT seconds to send its headers, and at
connection_cap() connections the longest-idle one is closed to make room. No debug mode, and the client never sees a
traceback. Built on Starlette, served by uvicorn.
"""
import argparse
import asyncio
import io
import logging
import os
import resource
import socket
import stat
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache

import anyio
import numpy as np
import uvicorn
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from data.files import FORMATS_TEXT, TooManyPixels, decode_image
from data.query_images import raw_image
from utils.argtypes import int_in_range, positive_int
from utils.checkpoint import NETWORK_BOUNDS
from utils.errors import UserError, run_reporting_errors
from utils.paths import read_file_bytes
from utils.runlog import warn

from hashing.search.api import load_checkpoint
from hashing.search.index import HammingIndex
from hashing.search.exact import MAX_K
from hashing.search.export import database_collection
from hashing.search.page import PAGE

MAX_UPLOAD_BYTES = 10 << 20  # 10 MiB: a large photograph
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + (64 << 10)  # the upload and its form's fields
MAX_UPLOAD_PIXELS = 40_000_000  # 40 megapixels; PIL's own bomb limit is 89 M
MAX_FIGURE_BYTES = 32 << 20
# What a client may hold: slots decoding and encoding uploads (off the event loop), uploads in flight (each may
# spool up to MAX_BODY_BYTES to disk), connections, and the seconds it may take to send headers and a body.
DECODE_SLOTS = 2
MAX_UPLOADS = 4
MAX_CONNECTIONS = 500  # and at most half the file descriptors the process may open (connection_cap)
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
KEEP_ALIVE_TIMEOUT = 5.0
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
THUMBNAIL_SIDE = 192
FIGURES = ("topn", "pr", "convergence", "tsne")
LOCAL = "127.0.0.1"
logger = logging.getLogger("hashing.serve")


class ClientError(HTTPException):
    """A request the server refuses, with a one-line reason for the client."""


@dataclass(eq=False)  # hashable by identity, for its per-instance caches
class SearchService:
    """What the page and the JSON API answer from: the model, its run's query and database splits, their
    codes and labels, and an index over the database codes (ids = database indices)."""
    model: object  # hashing.search.api.CheckpointModel
    splits: object  # RetrievalSplits
    codes: object  # CodeSet of the query split and the database
    index: HammingIndex

    @classmethod
    def for_model(cls, model, data_root=None, index=None, splits=None):
        """index: a search backend over the database codes (ids = database indices; e.g. a Milvus collection,
        hashing.search.export.database_collection); None = a HammingIndex built here. splits: the run's splits
        where the caller has built them (else from data_root)."""
        splits = splits or model.splits(data_root)
        codes = model.split_codes(splits)
        return cls(model, splits, codes, index if index is not None else
                   HammingIndex.build(codes.database_bits, hash_bit=codes.hash_bit))

    @property
    def class_names(self):
        names = self.model.class_names
        return list(names) if names else [f"class {c}" for c in range(self.codes.num_classes)]

    def label_names(self, row):
        return [self.class_names[c] for c in np.flatnonzero(row)]

    @cached_property
    def query_labels(self):
        return self.codes.query_label_matrix() > 0

    @cached_property
    def database_labels(self):
        return self.codes.database_label_matrix() > 0

    def ranked(self, query_bits, k, query_labels=None):
        """The top-k answer for one packed query code: results in rank order and precision@k."""
        distances, ids = self.index.search(query_bits[None], k)
        results = []
        for distance, item in zip(distances[0].tolist(), ids[0].tolist()):
            relevant = None if query_labels is None else bool((query_labels & self.database_labels[item]).any())
            results.append({"id": item, "distance": distance, "labels": self.label_names(self.database_labels[item]),
                            "relevant": relevant, "image": f"/images/database/{item}"})
        marks = [result["relevant"] for result in results]
        precision = None if query_labels is None or not results else sum(marks) / len(marks)
        return {"k": len(results), "hash_bit": self.codes.hash_bit, "results": results, "precision_at_k": precision}

    def search_query(self, query_index, k):
        if not 0 <= query_index < len(self.codes.query_bits):
            raise ClientError(404, f"query_index must be 0 to {len(self.codes.query_bits) - 1}")
        labels = self.query_labels[query_index]
        answer = self.ranked(self.codes.query_bits[query_index], k, labels)
        answer["query"] = {"index": query_index, "labels": self.label_names(labels),
                           "image": f"/images/query/{query_index}"}
        return answer

    def search_image(self, image, k):
        answer = self.ranked(self.model.encode([image])[0], k)
        answer["query"] = {"index": None, "labels": [], "image": None}
        return answer

    def run_info(self):
        model, metrics = self.model, self.model.metrics or {}
        convention = metrics.get("convention") or {}
        whole = (metrics.get("run") or {}).get("hash_bit") in (None, model.hash_bit)  # else a prefix: its own mAP
        mean_ap = metrics.get("map") if whole else (metrics.get("map_by_bits") or {}).get(str(model.hash_bit))
        return {"dataset": model.dataset, "backbone": model.backbone.name, "hash_bit": model.hash_bit,
                "loss": (metrics.get("run") or {}).get("loss") or model.run.get("loss"), "map": mean_ap,
                "map_name": f"mAP@{metrics['map_topk']}" if "map_topk" in metrics else None,
                "convention": convention, "checkpoint": str(model.checkpoint), "queries": len(self.codes.query_bits),
                "database": len(self.codes.database_bits),
                "figures": [kind for kind in FIGURES if self.figure_path(kind)],
                "exact_index": self.index.exact}

    def figure_path(self, kind):
        """The run's figure `kind` (one of FIGURES) when it is a regular file (not a symlink) of at most
        MAX_FIGURE_BYTES, else None."""
        path = self.model.checkpoint.with_suffix(f".{kind}.png")
        try:
            status = os.lstat(path)
        except OSError:
            return None
        return path if stat.S_ISREG(status.st_mode) and status.st_size <= MAX_FIGURE_BYTES else None

    def figure(self, kind):
        """The PNG bytes of the run's figure `kind` as the file holds them now, or None (figure_path); opened
        without following a symlink put there since figure_path looked, and checked again on the opened file."""
        path = self.figure_path(kind)
        if path is None:
            return None
        try:
            return read_file_bytes(path, "figure", MAX_FIGURE_BYTES, follow_symlinks=False)
        except UserError:
            return None

    @lru_cache(maxsize=4096)
    def thumbnail(self, split_name, item):
        split = getattr(self.splits, split_name)
        try:
            image = raw_image(split, item)
        except UserError:  # the run's image file is gone or damaged
            raise ClientError(404, f"{split_name} image {item} cannot be read") from None
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        if max(image.size) < 96:  # tiny images (digits' 32 pixels) shown larger, pixels kept sharp
            scale = 96 // max(image.size)
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def requested_k(value, default):
    if value is None or value == "":
        return default
    if not str(value).isdigit() or not 1 <= int(value) <= MAX_K:
        raise ClientError(400, f"k must be an integer from 1 to {MAX_K}")
    return int(value)


def uploaded_image(data):
    """The RGB PIL image in uploaded bytes, decoded as --query decodes a file (data.files.decode_image);
    ClientError when it is no image of the project's formats or has too many pixels."""
    try:
        return decode_image(io.BytesIO(data), max_pixels=MAX_UPLOAD_PIXELS)
    except TooManyPixels as exc:
        raise ClientError(413, f"the image is too large: {exc}; upload a smaller one") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ClientError(413, "the image would decompress to too many pixels: upload a smaller one") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ClientError(415, f"the upload is not an image the server reads ({FORMATS_TEXT})") from None


def page(request):
    return HTMLResponse(PAGE)


def run(request):
    return JSONResponse(request.app.state.service.run_info())


async def search(request: Request):
    """GET: a query of the query split (query_index, k); POST: an uploaded image (form fields image, k). The work
    runs off the event loop; an upload's decoding and encoding in one of DECODE_SLOTS threads."""
    service, default_k = request.app.state.service, request.app.state.default_k
    if request.method == "GET":
        query = request.query_params.get("query_index")
        if query is None or not query.isdigit():
            raise ClientError(400, "query_index must be a non-negative integer (or POST an image)")
        k = requested_k(request.query_params.get("k"), default_k)
        return JSONResponse(await run_in_threadpool(service.search_query, int(query), k))
    data, k = await uploaded_form(request, default_k)
    answer = await anyio.to_thread.run_sync(lambda: service.search_image(uploaded_image(data), k),
                                            limiter=request.app.state.decode_slots)
    return JSONResponse(answer)


async def uploaded_form(request, default_k):
    """(the bytes of the form's field 'image', k) of an upload; ClientError when it is not one."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise ClientError(411, "an upload needs a Content-Length")
    if int(length) > MAX_BODY_BYTES:
        raise ClientError(413, f"the upload is {int(length):,} bytes, more than {MAX_UPLOAD_BYTES:,}")
    async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ClientError(400, "POST the image as the form field 'image'")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        k = requested_k(form.get("k"), default_k)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ClientError(413, f"the upload is more than {MAX_UPLOAD_BYTES:,} bytes")
    return data, k


def image(request):
    """A thumbnail by split name and index: the request picks an item, never a file."""
    service = request.app.state.service
    split, item = request.path_params["split"], request.path_params["item"]
    count = {"query": len(service.codes.query_bits), "database": len(service.codes.database_bits)}.get(split)
    if count is None or item >= count:
        raise ClientError(404, "no such image")
    return Response(service.thumbnail(split, item), media_type="image/png", headers={"Cache-Control": "max-age=3600"})


def figure(request):
    kind = request.path_params["kind"]
    data = request.app.state.service.figure(kind) if kind in FIGURES else None
    if data is None:
        raise ClientError(404, "no such figure")
    return Response(data, media_type="image/png")


async def client_error(request, exc):
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def server_error(request, exc):
    logger.exception("search server error on %s", request.url.path)
    return JSONResponse({"error": "internal error: the server could not answer this request"}, status_code=500)


def create_app(service, default_k=10, hosts=LOCAL_NAMES):
    """The Starlette application over a SearchService, answering only requests addressed to one of `hosts`."""
    routes = [Route("/", page), Route("/api/run", run), Route("/api/search", search, methods=["GET", "POST"]),
              Route("/images/{split:str}/{item:int}", image), Route("/figures/{kind:str}", figure)]
    middleware = [Middleware(RequestGuard, hosts=hosts), Middleware(SecurityHeaders)]
    app = Starlette(debug=False, routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: client_error, Exception: server_error})
    app.state.service, app.state.default_k = service, default_k
    app.state.decode_slots = anyio.CapacityLimiter(DECODE_SLOTS)
    return app


class SecurityHeaders:
    """Headers that keep the page from being framed or sniffed, and allow no script but its own."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                                       (b"content-security-policy", b"default-src 'self'; img-src 'self' blob:; "
                                                                    b"script-src 'self' 'unsafe-inline'; "
                                                                    b"style-src 'self' 'unsafe-inline'")]
            await send(message)

        await self.app(scope, receive, with_headers)


def host_name(header):
    """The name in a Host header ("127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"), lower-case."""
    name = header.strip().lower()
    if name.startswith("["):
        return name[1:name.find("]")] if "]" in name else ""
    return name.rpartition(":")[0] if name.count(":") == 1 else name


def refusal(scope, headers, hosts):
    """(status, reason) when a request may not be answered: addressed to another host than the server listens
    as (DNS rebinding), or a POST from a page of another origin; else None."""
    host = headers.get(b"host", b"").decode("latin-1")
    if host_name(host) not in hosts:
        return 421, "this server answers only requests addressed to " + ", ".join(hosts)
    if scope["method"] in ("GET", "HEAD"):
        return None
    origin = headers.get(b"origin", b"").decode("latin-1")
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1")
    if (origin and origin != f"{scope.get('scheme', 'http')}://{host}") or site not in ("", "same-origin", "none"):
        return 403, "a page of another site may not post to this server"
    return None


class RequestGuard:
    """Refuses foreign hosts and origins (refusal), more than MAX_UPLOADS uploads at once, and a body larger than
    MAX_BODY_BYTES or slower than BODY_TIMEOUT seconds, counted while it streams in."""

    def __init__(self, app, hosts=LOCAL_NAMES):
        self.app, self.hosts, self.uploads = app, tuple(hosts), 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = refusal(scope, dict(scope["headers"]), self.hosts)
        if refused is None and scope["method"] == "POST" and self.uploads >= MAX_UPLOADS:
            refused = 503, f"the server is busy with {MAX_UPLOADS} uploads: try again in a moment"
        if refused is not None:
            return await JSONResponse({"error": refused[1]}, status_code=refused[0])(scope, receive, send)
        counted = scope["method"] == "POST"
        self.uploads += counted
        try:
            await self.app(scope, capped_body(receive), send)
        finally:
            self.uploads -= counted


def capped_body(receive):
    """`receive` that raises ClientError once the body exceeds MAX_BODY_BYTES or BODY_TIMEOUT seconds."""
    deadline, received = time.monotonic() + BODY_TIMEOUT, 0

    async def guarded():
        nonlocal received
        try:
            message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise ClientError(408, f"the request's body took more than {BODY_TIMEOUT:g} s") from None
        received += len(message.get("body", b""))
        if received > MAX_BODY_BYTES:
            raise ClientError(413, f"the request's body is more than {MAX_BODY_BYTES:,} bytes")
        return message

    return guarded


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, which waits at most HEADER_TIMEOUT seconds for a request's headers (uvicorn
    waits forever), and which at connection_cap() connections makes room by closing the longest-idle one, so idle
    sockets can neither use up the process's file descriptors nor lock others out."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self.idle_since, self.header_timer = time.monotonic(), None
        open_ones = [other for other in self.connections if not other.transport.is_closing()]
        if len(open_ones) >= self.config.limit_concurrency:
            idle = [other for other in open_ones if other is not self and not other.busy()]
            (min(idle, key=lambda other: other.idle_since) if idle else self).transport.close()
        self.arm_header_timer()

    def busy(self):
        return self.cycle is not None and not self.cycle.response_complete

    def arm_header_timer(self):
        if self.header_timer is None and not self.busy():
            self.idle_since = time.monotonic()
            self.header_timer = self.loop.call_later(HEADER_TIMEOUT, self.close_if_idle)
        elif self.header_timer is not None and self.busy():
            self.header_timer.cancel()
            self.header_timer = None

    def close_if_idle(self):
        self.header_timer = None
        if not self.busy() and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data):
        super().data_received(data)
        self.arm_header_timer()

    def connection_lost(self, exc):
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)


def connection_cap():
    """The most connections the server holds: MAX_CONNECTIONS, and at most half the file descriptors the process
    may open (`ulimit -n`), which leaves room for the connections being accepted and for its files."""
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_CONNECTIONS if soft_limit == resource.RLIM_INFINITY else max(8, min(MAX_CONNECTIONS, soft_limit // 2))


def server_config(app):
    """uvicorn's configuration of the search server: its connection limits and timeouts, no access log."""
    return uvicorn.Config(app, http=GuardedH11Protocol, timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                          limit_concurrency=connection_cap() + 1, backlog=32, log_level="warning", access_log=False)


def bound_socket(host, port):
    """A listening socket on (host, port); UserError in one line when the port is taken or not allowed."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): is another server using it? "
                        "Pass another --port") from None
    return sock


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the trained checkpoint (its run's files next to it)")
    parser.add_argument("--data_root", default=None, help="where the run's dataset is (default: the run's)")
    parser.add_argument("--dataset", default=None, help="the dataset, where the checkpoint has no run files")
    parser.add_argument("--backbone", default=None, help="the backbone, where the checkpoint does not say")
    parser.add_argument("--hash_bit", type=positive_int, default=None,
                        help="the bits, where the checkpoint does not say")
    parser.add_argument("--prefix_bits", type=int_in_range(1, NETWORK_BOUNDS["hash_bit"]), default=None, metavar="B",
                        help="search with the first B bits of every code (a nested run's B-bit code; default: all)")
    parser.add_argument("--host", default=LOCAL, help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int_in_range(0, 65535), default=8000,
                        help="port to listen on (0: any free port, which it prints)")
    parser.add_argument("--k", type=int_in_range(1, MAX_K), default=10,
                        help=f"results per search unless the request says (at most {MAX_K})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--index", type=index_spec, default="exact", metavar="exact|milvus:URI",
                        help="exact: an index built at start; milvus:FILE.db or milvus:http://HOST:19530: the "
                        "collection python -m hashing.export wrote")
    parser.add_argument("--collection", default=None,
                        help="--index milvus: the collection (default: hyp2_ and the checkpoint's file name)")
    parser.add_argument("--token", default=os.environ.get("MILVUS_TOKEN"),
                        help="--index milvus: server credentials (default: $MILVUS_TOKEN)")
    return parser


def index_spec(text):
    """--index: 'exact' or 'milvus:URI'."""
    if text == "exact" or (text.startswith("milvus:") and len(text) > len("milvus:")):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither exact nor milvus:URI (milvus:FILE.db, "
                                     "milvus:http://HOST:19530)")


def open_index(model, args, splits=None):
    """The search backend --index names, or None for the exact index built at start."""
    if args.index == "exact":
        return None
    return database_collection(model, args.index[len("milvus:"):], args.collection, args.token,
                               data_root=args.data_root, splits=splits)


def main(args):
    if args.host != LOCAL:
        warn(f"--host {args.host}: the search page is reachable from other machines on that network, without "
             "authentication")
    model = load_checkpoint(args.checkpoint, dataset=args.dataset, backbone=args.backbone, hash_bit=args.hash_bit,
                            device=args.device, bits=args.prefix_bits)
    splits = model.splits(args.data_root)  # built once, for the collection's check and the service
    index = open_index(model, args, splits)
    service = SearchService.for_model(model, args.data_root, index, splits)
    sock = bound_socket(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"search page for {model.checkpoint} ({model.dataset}, {model.backbone.name}, {model.hash_bit} bits, "
          f"{len(service.codes.database_bits)} database items{f', in {index!r}' if index is not None else ''}) at http://{host}:{sock.getsockname()[1]}/  "
          "(Ctrl-C stops it)", flush=True)
    server = uvicorn.Server(server_config(create_app(service, args.k, listening_names(args.host))))
    try:
        server.run(sockets=[sock])
    finally:
        if index is not None:
            index.close()


def listening_names(host):
    """The host names a request may address the server as: this machine's loopback names, and the address it
    listens on; for a wildcard address (0.0.0.0, ::) also the machine's own names and addresses."""
    names = set(LOCAL_NAMES) | {host.lower()}
    if host in ("0.0.0.0", "::", ""):
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name.lower())
            try:
                names |= {info[4][0] for info in socket.getaddrinfo(name, None)}
            except OSError:
                pass
    return tuple(sorted(names))


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    run_reporting_errors(lambda: main(args), interrupted_hint=": the search page stopped")

