"""A search page for a trained checkpoint: pick a query of the run's query split or upload an image, and see
the top-k database items with their Hamming distances, labels and relevance.

    python -m hashing.serve --checkpoint result/digits_small_48.ckpt            # http://127.0.0.1:8000
    python -m hashing.serve --checkpoint CKPT --data_root /data --port 8080 --k 20

The dataset, backbone and bits come from the checkpoint and its run's files (hashing/api.load_checkpoint);
--data_root where the data lies elsewhere than the run said. The JSON API:

    GET  /api/search?query_index=N&k=K    the N-th image of the query split
    POST /api/search                      multipart form: image=<file> (and k=K)
    GET  /api/run                         the run: dataset, backbone, bits, mAP and its convention, figures

answers {"results": [{"id", "distance", "labels", "relevant"}, ...], ...} in rank order: ids are database
indices, the order is the evaluator's (distance, then index), as --query prints it.

Safe by default: it binds 127.0.0.1 (--host to change it, with a warning); images are served by index (no
part of a request names a file); uploads are capped in bytes (MAX_UPLOAD_BYTES) and pixels (MAX_UPLOAD_PIXELS),
and a file that is not an image gets a 4xx with the reason; no debug mode, and the client never sees a
traceback. Built on Starlette, served by uvicorn.
"""
import argparse
import io
import logging
import socket
import warnings
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import uvicorn
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from data.query_images import raw_image
from utils.argtypes import positive_int
from utils.errors import UserError, run_reporting_errors
from utils.runlog import warn

from .api import load_checkpoint
from .index import HammingIndex
from .serve_page import PAGE

MAX_UPLOAD_BYTES = 10 << 20  # 10 MiB: a large photograph
MAX_UPLOAD_PIXELS = 40_000_000  # 40 megapixels; PIL's own bomb limit is 89 M
MAX_K = 200
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
    model: object  # hashing.api.CheckpointModel
    splits: object  # RetrievalSplits
    codes: object  # CodeSet of the query split and the database
    index: HammingIndex

    @classmethod
    def for_model(cls, model, data_root=None):
        splits = model.splits(data_root)
        codes = model.split_codes(splits)
        return cls(model, splits, codes, HammingIndex.build(codes.database_bits, hash_bit=codes.hash_bit))

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
        return {"dataset": model.dataset, "backbone": model.backbone.name, "hash_bit": model.hash_bit,
                "loss": (metrics.get("run") or {}).get("loss") or model.run.get("loss"), "map": metrics.get("map"),
                "map_name": f"mAP@{metrics['map_topk']}" if "map_topk" in metrics else None,
                "convention": convention, "checkpoint": str(model.checkpoint), "queries": len(self.codes.query_bits),
                "database": len(self.codes.database_bits), "figures": [kind for kind in FIGURES if self.figure(kind)],
                "exact_index": self.index.exact}

    @lru_cache(maxsize=None)
    def figure(self, kind):
        """The PNG bytes of the run's figure `kind` (one of FIGURES) if it was drawn, else None."""
        path = self.model.checkpoint.with_suffix(f".{kind}.png")
        return path.read_bytes() if path.is_file() else None

    @lru_cache(maxsize=4096)
    def thumbnail(self, split_name, item):
        split = getattr(self.splits, split_name)
        image = raw_image(split, item)
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
    """The RGB PIL image in uploaded bytes; ClientError when it is no image or has too many pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise ClientError(413, f"the image has {image.width} x {image.height} pixels, more than "
                                       f"{MAX_UPLOAD_PIXELS:,}: upload a smaller one")
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise ClientError(415, "the upload is not an image PIL can read (PNG, JPEG, ...)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ClientError(413, "the image would decompress to too many pixels: upload a smaller one") from None
    return image.convert("RGB")


def page(request):
    return HTMLResponse(PAGE)


def run(request):
    return JSONResponse(request.app.state.service.run_info())


async def search(request: Request):
    """GET: a query of the query split (query_index, k); POST: an uploaded image (form fields image, k)."""
    service, default_k = request.app.state.service, request.app.state.default_k
    if request.method == "GET":
        query = request.query_params.get("query_index")
        if query is None or not query.isdigit():
            raise ClientError(400, "query_index must be a non-negative integer (or POST an image)")
        return JSONResponse(service.search_query(int(query), requested_k(request.query_params.get("k"), default_k)))
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise ClientError(411, "an upload needs a Content-Length")
    if int(length) > MAX_UPLOAD_BYTES:
        raise ClientError(413, f"the upload is {int(length):,} bytes, more than {MAX_UPLOAD_BYTES:,}")
    async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ClientError(400, "POST the image as the form field 'image'")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        k = requested_k(form.get("k"), default_k)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ClientError(413, f"the upload is more than {MAX_UPLOAD_BYTES:,} bytes")
    return JSONResponse(service.search_image(uploaded_image(data), k))


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


def create_app(service, default_k=10):
    """The Starlette application over a SearchService."""
    routes = [Route("/", page), Route("/api/run", run), Route("/api/search", search, methods=["GET", "POST"]),
              Route("/images/{split:str}/{item:int}", image), Route("/figures/{kind:str}", figure)]
    app = Starlette(debug=False, routes=routes, middleware=[Middleware(SecurityHeaders)],
                    exception_handlers={HTTPException: client_error, Exception: server_error})
    app.state.service, app.state.default_k = service, default_k
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
                                       (b"content-security-policy", b"default-src 'self'; img-src 'self'; "
                                                                    b"script-src 'self' 'unsafe-inline'; "
                                                                    b"style-src 'self' 'unsafe-inline'")]
            await send(message)

        await self.app(scope, receive, with_headers)


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
    parser.add_argument("--host", default=LOCAL, help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--k", type=positive_int, default=10, help="results per search unless the request says")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def main(args):
    if args.host != LOCAL:
        warn(f"--host {args.host}: the search page is reachable from other machines on that network, without "
             "authentication")
    model = load_checkpoint(args.checkpoint, dataset=args.dataset, backbone=args.backbone, hash_bit=args.hash_bit,
                            device=args.device)
    service = SearchService.for_model(model, args.data_root)
    sock = bound_socket(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"search page for {model.checkpoint} ({model.dataset}, {model.backbone.name}, {model.hash_bit} bits, "
          f"{len(service.codes.database_bits)} database items) at http://{host}:{args.port}/  (Ctrl-C stops it)")
    server = uvicorn.Server(uvicorn.Config(create_app(service, args.k), log_level="warning", access_log=False))
    server.run(sockets=[sock])


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    run_reporting_errors(lambda: main(args), interrupted_hint=": the search page stopped")


if __name__ == "__main__":
    cli()
