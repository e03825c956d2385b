"""Benchmark of the web UI: concurrent gradio_client searches against a live server.

20 clients x 50 searches (each uploads its query image, as a browser does) against the real
server on 127.0.0.1, beside the bare ``Collection.search`` of the same queries in the same run:
one client at a time (the latency a user sees; goal: server p50 within 1.5x of the bare search)
and 20 at once (throughput and errors; goal: zero errors). The latency a user sees is measured
with plain HTTP, the requests a browser makes (upload, queue the call, read its event stream);
``gradio_client`` adds about 100 ms of its own per call on 2 cores (its worker threads and
polling), so its row is shown but not used for the ratio. Prints a table and writes JSON to
bench/results/.

Examples:
    python bench/bench_app.py                          # synthetic 200-image collection
    python bench/bench_app.py --collection ~/.cache/moco-search/demo/collection
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_collection(out: Path, n: int) -> Path:
    """``n`` 64x64 PNGs in 4 label folders, indexed with a random-init resnet18 at 64 px."""
    from PIL import Image

    from indexes import index_images
    from moco import EncoderConfig, build_encoder, save_encoder

    rng = np.random.default_rng(0)
    for i in range(n):
        d = out / "images" / f"label{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((16, 16, 1), np.uint8))).save(d / f"{i:05d}.png")
    torch.manual_seed(0)
    cfg = EncoderConfig(arch="resnet18", feature_dim=512, image_size=64, crop_pct=1.0)
    save_encoder(build_encoder("resnet18"), cfg, out / "enc")
    index_images([out / "images"], out / "collection", out / "enc", workers=0)
    return out / "collection"


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def run_clients(
    n_clients: int, per_client: int, call: Callable[[int, int], Any]
) -> tuple[list[float], int, float]:
    """Latencies, error count and wall seconds of ``n_clients`` threads x ``per_client`` calls."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(n_clients + 1)

    def worker(c: int) -> None:
        start.wait()
        for j in range(per_client):
            t0 = time.perf_counter()
            try:
                call(c, j)
            except Exception as e:
                with lock:
                    errors[0] += 1
                print(f"client {c} request {j}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            with lock:
                lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return lat, errors[0], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--collection",
        type=Path,
        default=None,
        help="collection to serve (default: a synthetic one)",
    )
    ap.add_argument("--images", type=int, default=200, help="synthetic collection size")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--searches", type=int, default=50, help="searches per client")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=4, help="server concurrency limit")
    args = ap.parse_args(argv)

    from gradio_client import Client, handle_file

    from app.context import AppContext
    from app.server import ServerConfig, launch

    tmp = Path(tempfile.mkdtemp(prefix="bench-app-"))
    coll = args.collection or synthetic_collection(tmp, args.images)
    ctx = AppContext.open(coll)
    queries = [r.path for r in ctx.collection.query_records("images.status = 'ok'")][:64]
    ctx.example = queries[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(ctx, ServerConfig(port=port, concurrency=args.concurrency))
    clients = [
        Client(demo.local_url, verbose=False, download_files=False) for _ in range(args.clients)
    ]

    def served(c: int, j: int) -> None:
        q = queries[(c * args.searches + j) % len(queries)]
        _, rows, _ = clients[c].predict(handle_file(q), args.k, "(any)", "", -1, api_name="/search")
        assert len(rows) == min(args.k, len(ctx.collection)) and rows[0]["path"] == q

    http = httpx.Client(base_url=demo.local_url.rstrip("/") + "/gradio_api", timeout=60)

    def served_http(c: int, j: int) -> None:
        q = queries[(c * args.searches + j) % len(queries)]
        with open(q, "rb") as f:
            path = http.post("/upload", files={"files": (Path(q).name, f)}).json()[0]
        data = [{"path": path, "meta": {"_type": "gradio.FileData"}}, args.k, "(any)", "", -1]
        event = http.post("/call/search", json={"data": data}).json()["event_id"]
        with http.stream("GET", f"/call/search/{event}") as resp:
            body = "".join(resp.iter_text())
        assert body.startswith("event: complete"), body[:200]
        result = json.loads(body.split("data: ", 1)[1])
        assert len(result[1]) == min(args.k, len(ctx.collection)) and result[1][0]["path"] == q

    def bare(c: int, j: int) -> None:
        q = queries[(c * args.searches + j) % len(queries)]
        hits = ctx.collection.search(q, k=args.k)
        assert hits[0].path == q

    for j in range(5):  # warm up both paths (model load, first uploads)
        bare(0, j)
        served(0, j)
        served_http(0, j)
    n_seq = min(args.searches, 50)
    rows: dict[str, dict[str, Any]] = {}
    for name, fn, n_cli, per in [
        ("bare Collection.search, 1 thread", bare, 1, n_seq),
        ("server, 1 client (HTTP, as a browser)", served_http, 1, n_seq),
        ("server, 1 client (gradio_client)", served, 1, n_seq),
        (f"bare Collection.search, {args.clients} threads", bare, args.clients, args.searches),
        (f"server, {args.clients} clients", served, args.clients, args.searches),
    ]:
        lat, errors, wall = run_clients(n_cli, per, fn)
        rows[name] = {
            "requests": n_cli * per,
            "errors": errors,
            "requests_per_s": len(lat) / wall,
            **percentiles(lat),
        }
    demo.close()
    ratio = (
        rows["server, 1 client (HTTP, as a browser)"]["p50_ms"]
        / rows["bare Collection.search, 1 thread"]["p50_ms"]
    )
    print(
        f"\ncollection: {coll} ({len(ctx.collection)} images), k={args.k}, server concurrency "
        f"{args.concurrency}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
    )
    print(f"{'':46} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in rows.items():
        print(
            f"{name:46} {r['requests']:8d} {r['errors']:6d} {r['requests_per_s']:8.1f} "
            f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f}"
        )
    print(f"server p50 / bare p50 (one at a time): {ratio:.2f}x (goal <= 1.5x)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_app_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "collection": str(coll),
                "images": len(ctx.collection),
                "k": args.k,
                "clients": args.clients,
                "searches_per_client": args.searches,
                "concurrency": args.concurrency,
                "cpus": os.cpu_count(),
                "results": rows,
                "p50_ratio_single": ratio,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    total_errors = sum(r["errors"] for r in rows.values())
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
