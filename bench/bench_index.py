"""Benchmark of indexes/: indexing throughput, unchanged re-runs, search latency and recall.

Prints tables and writes JSON to bench/results/. Three parts, each skippable:

1. End-to-end images/s, JPEG files on disk -> saved collection, for resnet18 at 224 px, beside two
   references measured in the same run: the project's encoder forward on pre-decoded tensors
   (channels-last, inference mode; goal: indexing >= 0.85 of it) and a naive eager fp32 NCHW
   forward (goal: indexing >= 1.5x it).
2. A re-run over an unchanged collection of N files (goal: under 3 s for 30k).
3. FAISS search with the automatically chosen index on clustered unit vectors (the structure of
   real embeddings; uniform random vectors are a worst case): p50/p99 latency of one query,
   recall@10 against exact search, bytes per vector.

Examples:
    python bench/bench_index.py --images 256 --rerun-files 3000 --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexes import index_images, vectors
from moco import EncoderConfig, build_encoder, save_encoder

RESULTS = Path(__file__).resolve().parent / "results"


def photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth random image (compresses like a photo, unlike noise)."""
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def write_jpegs(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"{i // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        photo(rng, size).save(d / f"{i:06d}.jpg", quality=90)


def forward_rate(model: torch.nn.Module, x: torch.Tensor, channels_last: bool,
                 repeats: int) -> float:
    """Images/s of ``model`` on a pre-decoded batch ``x``."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.inference_mode() if channels_last else torch.no_grad()
    with ctx:
        model(x)  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return repeats * len(x) / (time.perf_counter() - t)


def bench_throughput(work: Path, n: int, batch: int, workers: int) -> dict:
    enc = work / "enc224"
    torch.manual_seed(0)
    save_encoder(build_encoder("resnet18"), EncoderConfig(arch="resnet18"), enc)
    write_jpegs(work / "jpegs", n, size=(1440, 1080))  # 1.5 MP
    t = time.perf_counter()
    report = index_images([work / "jpegs"], work / "coll224", enc, batch_size=batch,
                          workers=workers)
    e2e = report.total / (time.perf_counter() - t)
    x = torch.randn(batch, 3, 224, 224)
    ours = forward_rate(build_encoder("resnet18").eval(), x, True, repeats=3)
    naive = forward_rate(build_encoder("resnet18").eval(), x, False, repeats=3)
    return {"images": n, "end_to_end_img_s": e2e, "forward_ours_img_s": ours,
            "forward_naive_img_s": naive, "ratio_vs_ours": e2e / ours,
            "ratio_vs_naive": e2e / naive, "threads": torch.get_num_threads()}


def bench_rerun(work: Path, n: int) -> dict:
    enc = work / "enc32"
    save_encoder(build_encoder("resnet18", small_stem=True),
                 EncoderConfig(arch="resnet18", small_stem=True, image_size=32, crop_pct=1.0),
                 enc)
    rng = np.random.default_rng(1)
    root = work / "small"
    for i in range(n):
        d = root / f"{i // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        photo(rng, (40, 32)).save(d / f"{i:06d}.jpg")
    t = time.perf_counter()
    index_images([root], work / "coll32", enc, batch_size=256)
    first = time.perf_counter() - t
    t = time.perf_counter()
    r = index_images([root], work / "coll32", None)
    assert r.unchanged == n and r.added == 0, r
    return {"files": n, "first_run_s": first, "unchanged_rerun_s": time.perf_counter() - t}


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around n/100 centres, intra-cluster cosine about 0.8."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_search(n: int, dim: int, queries: int = 200) -> dict:
    x = clustered(n, dim)
    ids = np.arange(1, n + 1, dtype=np.int64)

    def chunks():
        for s in range(0, n, 65536):
            yield ids[s : s + 65536], x[s : s + 65536]

    factory = vectors.choose_factory(n)
    t = time.perf_counter()
    index = vectors.build(factory, dim, ids, lambda i: x[i - 1], chunks())
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    q = x[rng.choice(n, queries, replace=False)]
    q = q + 0.05 * rng.standard_normal(q.shape).astype(np.float32)  # near, not equal, to members
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = vectors.exact_knn(q, chunks(), 10)
    params, recall = vectors.tune(index, q, truth)
    p = vectors.search_params(index, params)
    lat = []
    for row in q:
        t = time.perf_counter()
        index.search(row[None], 10, params=p) if p is not None else index.search(row[None], 10)
        lat.append((time.perf_counter() - t) * 1e3)
    return {"vectors": n, "dim": dim, "factory": factory, "params": params,
            "recall_at_10": recall, "p50_ms": float(np.median(lat)),
            "p99_ms": float(np.percentile(lat, 99)), "build_s": build_s,
            "bytes_per_vector": vectors.memory_bytes(index) / n}


def table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print("  ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print("  ".join(f"{v:>14.4g}" if isinstance(v, float) else f"{v!s:>14}" for v in
                        r.values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="JPEGs for part 1 (0 skips)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: auto)")
    ap.add_argument("--rerun-files", type=int, default=30_000, help="files for part 2 (0 skips)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                    help="vector counts for part 3 (default: 10k 100k 1M)")
    ap.add_argument("--dim", type=int, default=512, help="vector dim (default: 512)")
    args = ap.parse_args(argv)
    out: dict = {"time": time.time(), "cpus": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.images:
            out["throughput"] = bench_throughput(work, args.images, args.batch_size,
                                                 args.workers if args.workers is not None
                                                 else min(8, os.cpu_count() or 1))
            table([out["throughput"]], "indexing throughput, resnet18 224 px")
        if args.rerun_files:
            out["rerun"] = bench_rerun(work, args.rerun_files)
            table([out["rerun"]], "unchanged re-run")
    if args.sizes:
        out["search"] = [bench_search(n, args.dim) for n in args.sizes]
        table([{k: v for k, v in r.items() if k != "params"} for r in out["search"]],
              "search, automatically chosen index")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_index_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
