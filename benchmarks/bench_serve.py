"""Load on the search page's JSON API: REQUESTS concurrent GET /api/search requests from a local client.

    python -m benchmarks.bench_serve --checkpoint result/digits_small_48.ckpt            # 200 at once
    python -m benchmarks.bench_serve --checkpoint CKPT --requests 200 --rounds 3 --k 10

Starts `python -m hashing.serve` on 127.0.0.1 (a free port; loopback only), waits for it, then sends every
request of a round at once (httpx, asynchronously, one connection each), each for a query of the query split
in turn, and reports per round the latency percentiles (p50, p99, max), requests per second and the requests
that failed (a status other than 200 or a connection error). The server is stopped at the end.
"""
import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hashing.search.server import bound_socket  # noqa: E402
from utils.argtypes import positive_int  # noqa: E402
from utils.errors import UserError, run_reporting_errors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the checkpoint to serve")
    parser.add_argument("--requests", type=positive_int, default=200, help="concurrent requests per round")
    parser.add_argument("--rounds", type=positive_int, default=3, help="rounds (the first also warms the server)")
    parser.add_argument("--k", type=positive_int, default=10, help="results per search")
    return parser


def free_port():
    sock = bound_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


def start_server(checkpoint, port, timeout=300):
    server = subprocess.Popen([sys.executable, "-m", "hashing.serve", "--checkpoint", str(checkpoint), "--port",
                               str(port), "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UserError(f"the server stopped: {server.stderr.read().strip().splitlines()[-1:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/run", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.terminate()
    raise UserError(f"the server did not answer within {timeout} s")


async def one_round(port, requests, k, queries):
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120) as client:
        async def request(number):
            started = time.perf_counter()
            try:
                response = await client.get(f"/api/search?query_index={number % queries}&k={k}")
                ok = response.status_code == 200 and len(response.json()["results"]) == k
            except httpx.HTTPError:
                ok = False
            return time.perf_counter() - started, ok

        started = time.perf_counter()
        results = await asyncio.gather(*(request(number) for number in range(requests)))
        return results, time.perf_counter() - started


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(options):
    port = free_port()
    server = start_server(options.checkpoint, port)
    try:
        queries = httpx.get(f"http://127.0.0.1:{port}/api/run").json()["queries"]
        print("| round | requests | p50 (ms) | p99 (ms) | max (ms) | requests/s | failed |\n" + "|---" * 7 + "|")
        failed_total = 0
        for round_number in range(1, options.rounds + 1):
            results, seconds = asyncio.run(one_round(port, options.requests, options.k, queries))
            latencies = [latency * 1000 for latency, _ in results]
            failed = sum(not ok for _, ok in results)
            failed_total += failed
            print(f"| {round_number} | {options.requests} | {statistics.median(latencies):.0f} | "
                  f"{percentile(latencies, 0.99):.0f} | {max(latencies):.0f} | {options.requests / seconds:.0f} | "
                  f"{failed} |", flush=True)
        print(f"{options.rounds} rounds of {options.requests} concurrent requests, {failed_total} failed",
              file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return failed_total


def cli(argv=None):
    options = get_args_parser().parse_args(argv)
    sys.exit(1 if run_reporting_errors(lambda: main(options)) else 0)


if __name__ == "__main__":
    cli()
