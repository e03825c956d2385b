"""Benchmark of indexes/: indexing throughput, unchanged re-runs, search latency and recall.

Prints tables and writes JSON to bench/results/. Three parts, each skippable:

1. End-to-end images/s, JPEG files on disk -> saved collection, for resnet18 at 224 px, beside two
   references measured in the same run: the project's encoder forward on pre-decoded tensors
   (channels-last, inference mode; goal: indexing >= 0.85 of it) and a naive eager fp32 NCHW
   forward (goal: indexing >= 1.5x it).
2. A re-run over an unchanged collection of N files (goal: under 3 s for 30k).
3. Search at scale: a real collection (SQLite rows + vectors, manifest) of N synthetic vectors
   resampled and perturbed from a real collection's embeddings (``Synth``), its index built by
   ``index``'s own step for a memory budget; then a fresh process opens it (memory-mapped) and
   runs held-out queries with ``Collection.search_vector``, with and without a label filter:
   bytes per vector (index and database), build time, p50/p99 latency for k=10, recall@10
   against exact search over the stored vectors, open time and the serving process's RSS.
4. ``index --reembed``: a collection indexed with one encoder, re-embedded in place with another,
   beside indexing the same files afresh with that encoder (goal: within 1.2x of it, since it
   also checks each file's hash and swaps); the database's size before and after.
5. A search by image from the command line, as a user runs it (a fresh process: imports, the
   encoder, one image, the index): wall time and peak RSS, beside the floor any embedding pays
   (``import torch``) and what importing torchvision would add (``import torch, torchvision``),
   measured in the same run; the best of ``--cli-runs`` each.

Examples:
    python bench/bench_index.py --images 256 --rerun-files 3000 --sizes 100000
    python bench/bench_index.py --images 0 --rerun-files 0 --sizes 1000000 --base emoji.coll
    python bench/bench_index.py --images 0 --rerun-files 0 --sizes --reembed-dir ~/emoji
    python bench/bench_index.py --images 0 --rerun-files 0 --sizes --cli-runs 5 --base tux.coll
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexes import index_images
from moco import EncoderConfig, build_encoder, save_encoder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


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


def forward_rate(
    model: torch.nn.Module, x: torch.Tensor, channels_last: bool, repeats: int
) -> float:
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
    report = index_images(
        [work / "jpegs"], work / "coll224", enc, batch_size=batch, workers=workers
    )
    e2e = report.total / (time.perf_counter() - t)
    x = torch.randn(batch, 3, 224, 224)
    ours = forward_rate(build_encoder("resnet18").eval(), x, True, repeats=3)
    naive = forward_rate(build_encoder("resnet18").eval(), x, False, repeats=3)
    return {
        "images": n,
        "end_to_end_img_s": e2e,
        "forward_ours_img_s": ours,
        "forward_naive_img_s": naive,
        "ratio_vs_ours": e2e / ours,
        "ratio_vs_naive": e2e / naive,
        "threads": torch.get_num_threads(),
    }


def bench_rerun(work: Path, n: int) -> dict:
    enc = work / "enc32"
    save_encoder(
        build_encoder("resnet18", small_stem=True),
        EncoderConfig(arch="resnet18", small_stem=True, image_size=32, crop_pct=1.0),
        enc,
    )
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


def bench_reembed(work: Path, images: Path | None, n: int, batch: int, workers: int) -> dict:
    """Part 4: two random-init resnet18 encoders at 64 px; ``images`` or ``n`` synthetic JPEGs."""
    encoders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        enc = work / f"enc64_{seed}"
        save_encoder(build_encoder("resnet18"), EncoderConfig(arch="resnet18", image_size=64), enc)
        encoders.append(enc)
    if images is None:
        images = work / "reembed_jpegs"
        write_jpegs(images, n, size=(640, 480), seed=2)
    coll, db = work / "coll_reembed", work / "coll_reembed" / "meta.db"
    kw = dict(batch_size=batch, workers=workers)
    index_images([images], coll, encoders[0], **kw)
    before = db.stat().st_size
    t = time.perf_counter()
    report = index_images([], coll, encoders[1], reembed=True, **kw)
    reembed_s = time.perf_counter() - t
    after = db.stat().st_size
    t = time.perf_counter()
    index_images([images], work / "coll_fresh", encoders[1], **kw)
    fresh_s = time.perf_counter() - t
    return {
        "images": report.reembedded,
        "reembed_s": reembed_s,
        "fresh_index_s": fresh_s,
        "ratio_vs_fresh": reembed_s / fresh_s,
        "reembed_img_s": report.reembedded / reembed_s,
        "db_mb_before": before / 2**20,
        "db_mb_after": after / 2**20,
    }


def real_base(coll: Path) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings (N x D) and label codes (N) of a real collection: the structure to copy."""
    from indexes import store
    from indexes.manifest import read_manifest

    dim = int(read_manifest(coll)["feature_dim"])
    db = store.open_store(coll / store.DB_NAME, create=False)
    ids, vecs = zip(*store.iter_vectors(db, dim), strict=True)
    ids_all, x = np.concatenate(ids), np.concatenate(vecs)
    label = dict(db.execute("SELECT id, label FROM images WHERE status = 'ok'").fetchall())
    names = sorted({str(v) for v in label.values()})
    codes = np.array([names.index(str(label[int(i)])) for i in ids_all], dtype=np.int16)
    return x, codes


class Synth:
    """Vectors with real features' structure, resampled and perturbed from ``base``.

    Each one is ``lam * a + (1 - lam) * b + noise``, renormalised: ``a`` a random real
    embedding, ``b`` one of its 10 nearest real neighbours, ``lam ~ U(0.5, 1)`` (points along
    the real manifold, not around a few centres), ``noise`` Gaussian shaped like the real data's
    covariance (its principal axes and spreads) at ``noise`` x their scale. The label is ``a``'s.
    """

    def __init__(self, base: np.ndarray, labels: np.ndarray, noise: float = 0.3) -> None:
        import faiss

        self.base, self.labels, self.noise = base, labels, noise
        self.nn = faiss.knn(base, base, 11, metric=faiss.METRIC_INNER_PRODUCT)[1][:, 1:]
        centred = base - base.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        self.axes = (s[:, None] / np.sqrt(len(base))) * vt  # D x D: std along each axis

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        a = rng.integers(0, len(self.base), n)
        b = self.nn[a, rng.integers(0, self.nn.shape[1], n)]
        lam = rng.uniform(0.5, 1.0, (n, 1)).astype(np.float32)
        x = lam * self.base[a] + (1 - lam) * self.base[b]
        z = rng.standard_normal((n, self.axes.shape[0])).astype(np.float32)
        x += self.noise * (z @ self.axes).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), self.labels[a]


def write_collection(
    coll: Path,
    synth: Synth,
    n: int,
    encoder: Path,
    dtype: str,
    queries: tuple[np.ndarray, np.ndarray],
    chunk: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """A real collection of ``n`` synthetic vectors (rows, vectors, manifest; no index yet).

    Returns the exact top-10 ids of each query, unfiltered and among its label, over the
    vectors as stored (float16 when ``dtype`` is), found chunk by chunk as they are written:
    10M vectors are never held at once.
    """
    from indexes import manifest, store, vectors
    from moco import read_encoder_config

    q, qlab = queries
    top = [vectors.TopK(len(q), 10), vectors.TopK(len(q), 10)]
    coll.mkdir(parents=True)
    db = store.open_store(coll / store.DB_NAME)
    with store.transaction(db):
        rid = store.root_id(db, "/synthetic")
        store.write_info(db, vector_dtype=dtype, generation=1)
    for start in range(0, n, chunk):
        x, lab = synth.sample(min(chunk, n - start), seed=start)
        ids = np.arange(start + 1, start + len(x) + 1)
        stored = x.astype(np.float16).astype(np.float32) if dtype == "float16" else x
        sims = q @ stored.T
        top[0].add(sims, ids)
        sims[lab[None, :] != qlab[:, None]] = -np.inf
        top[1].add(sims, ids)
        with store.transaction(db):
            db.conn.executemany(
                "INSERT INTO images (id, root_id, relpath, relpath_raw, size, mtime, label, "
                "status, indexed_at) VALUES (?, ?, ?, ?, 1, 0, ?, 'ok', 0)",
                [
                    (int(i), rid, f"{i}.jpg", f"{i}.jpg".encode(), f"l{c}")
                    for i, c in zip(ids, lab, strict=True)
                ],
            )
            db.conn.executemany(
                "INSERT INTO vectors (id, v) VALUES (?, ?)",
                [(int(i), store.to_blob(v, dtype)) for i, v in zip(ids, x, strict=True)],
            )
    db.conn.close()
    cfg = read_encoder_config(encoder)
    manifest.write_manifest(
        coll,
        {
            "encoder": manifest.encoder_entry(encoder, cfg),
            "feature_dim": cfg.feature_dim,
            "metric": "inner_product",
            "roots": ["/synthetic"],
            "index": {},
            "generation": None,
            "vector_dtype": dtype,
        },
    )
    return top[0].ids, top[1].ids


def build_index(coll: Path, limit: str) -> dict:
    """``index``'s FAISS step on the collection, as ``index --max-index-memory LIMIT`` runs it."""
    from indexes import budget, manifest, store, sync

    db = store.open_store(coll / store.DB_NAME)
    m = manifest.read_manifest(coll)
    t = time.perf_counter()
    m["index"] = sync.update_index(coll, db, m, "auto", budget.parse_bytes(limit))
    build_s = time.perf_counter() - t
    m["generation"] = store.generation(db)
    manifest.write_manifest(coll, m)
    db.conn.close()
    return {**m["index"], "build_s": build_s}


def serve(coll: Path, queries: Path, out: Path) -> None:
    """In a fresh process: open the collection, run the queries, report latency and RSS."""
    import resource

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import faiss

    from indexes import Collection, Filters

    # one FAISS thread per query, as a server answering single queries should run: on 2 shared
    # cores OpenMP's barriers made a 20k flat search 32 ms with 2 threads, 9.6 ms with 1
    faiss.omp_set_num_threads(1)
    data = np.load(queries)
    q, flabel = data["q"], data["label"]
    before = rss_mb()
    t = time.perf_counter()
    c = Collection.open(coll)
    res: dict = {
        "open_s": time.perf_counter() - t,
        "rss_before_open_mb": before,
        "rss_open_mb": rss_mb(),
    }
    # each set of queries twice: first just after opening (pages of the index and the
    # database mapped in by the queries that touch them), then again as a warm server runs
    for name, filt in (("plain", False), ("label", True), ("plain_warm", False)):
        lat, cpu, found = [], [], []
        for row, lab in zip(q, flabel, strict=True):
            f = Filters(label=f"l{lab}") if filt else None
            t, t_cpu = time.perf_counter(), time.thread_time()
            hits = c.search_vector(row, k=10, filters=f)
            lat.append((time.perf_counter() - t) * 1e3)
            cpu.append((time.thread_time() - t_cpu) * 1e3)  # one thread: what it cost us
            found.append([h.id for h in hits])
        res[name] = {"lat_ms": lat, "cpu_ms": cpu, "ids": found}
        print(f"serve {name}: p50 {np.median(lat[1:]):.3f} ms", flush=True)
    res["rss_end_mb"] = rss_mb()
    out.write_text(json.dumps(res))


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)])
    )


def bench_search(
    base: Path, encoder: Path, n: int, limit: str, dtype: str, work: Path, queries: int = 300
) -> dict:
    """One collection of ``n`` vectors: build for ``limit``, serve in a child process."""
    synth = Synth(*real_base(base))
    coll = work / f"synth_{n}_{limit}"
    q, qlab = synth.sample(queries, seed=10**9)  # held out: not in the collection
    t = time.perf_counter()
    truth, ftruth = write_collection(coll, synth, n, encoder, dtype, (q, qlab))
    write_s = time.perf_counter() - t
    entry = build_index(coll, limit)
    qfile = work / "queries.npz"
    np.savez(qfile, q=q, label=qlab)
    out = work / "serve.json"
    subprocess.run(
        [sys.executable, __file__, "--serve", str(coll), str(qfile), str(out)], check=True
    )
    res = json.loads(out.read_text())
    row = {
        "vectors": n,
        "budget": limit,
        "factory": entry["factory"],
        "nprobe": entry["params"].get("nprobe"),
        "rerank": entry["params"].get("rerank", 0),
        "index_bytes_per_vector": entry["file_bytes"] / n,
        "db_bytes_per_vector": (coll / "meta.db").stat().st_size / n,
        "write_db_s": write_s,
        "build_s": entry["build_s"],
        "recall_at_10_build": entry["recall_at_10"],
    }
    for name, t in (("plain", truth), ("label", ftruth), ("plain_warm", truth)):
        lat = res[name]["lat_ms"][1:]  # the first filtered query selects (and caches) its ids
        row[f"{name}_recall_at_10"] = recall(res[name]["ids"], t)
        row[f"{name}_p50_ms"] = float(np.median(lat))
        row[f"{name}_p99_ms"] = float(np.percentile(lat, 99))
        row[f"{name}_cpu_p50_ms"] = float(np.median(res[name]["cpu_ms"][1:]))
    row["label_first_query_ms"] = res["label"]["lat_ms"][0]
    row.update(
        open_s=res["open_s"],
        rss_before_open_mb=res["rss_before_open_mb"],
        rss_open_mb=res["rss_open_mb"],
        rss_end_mb=res["rss_end_mb"],
    )
    shutil.rmtree(coll)
    print(json.dumps(row), flush=True)  # kept even if a later size fails
    return row


def table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print("  ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(
            "  ".join(f"{v:>14.4g}" if isinstance(v, float) else f"{v!s:>14}" for v in r.values())
        )


PEAK_RSS = (
    "import atexit, sys; atexit.register(lambda: sys.stderr.write('peak_kb ' + "
    "open('/proc/self/status').read().split('VmHWM:')[1].split()[0] + chr(10)))"
)
"""Prints the process's own peak RSS at exit (Linux). A child's ``ru_maxrss`` would not do: it
counts the pages of the parent it was forked from, here a process with torch loaded."""


def timed_process(code: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a fresh ``python -c code``, which must succeed."""
    t0 = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", f"{PEAK_RSS}\n{code}"], cwd=ROOT, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if run.returncode or "peak_kb " not in run.stderr:
        raise RuntimeError(f"{code} failed: {run.stderr[-2000:]}")
    return seconds, int(run.stderr.rsplit("peak_kb ", 1)[1].split()[0]) / 1024


def bench_cli_search(coll: Path, runs: int) -> list[dict]:
    """``moco-search search --collection COLL IMAGE`` beside the imports it cannot avoid."""
    from indexes import Collection

    with Collection(coll) as c:
        query = c.records([1])[0].path
    search = ["launch.py", "search", "--collection", str(coll)]
    run = "import runpy, sys; sys.argv = {!r}; runpy.run_path('launch.py', run_name='__main__')"
    cases = {
        "import torch (floor)": "import torch",
        "import torch, torchvision": "import torch, torchvision",
        "search by image": run.format([*search, query]),
        "search --id (no torch)": run.format([*search, "--id", "1"]),
    }
    rows = []
    for what, code in cases.items():
        timed = sorted(timed_process(code) for _ in range(runs))
        rows.append({"process": what, "best_s": timed[0][0], "rss_mb": timed[0][1]})
    return rows


def demo_base(work: Path, encoder: Path) -> Path:
    images = encoder.parent / "images"
    index_images([images], work / "demo.coll", encoder, workers=1)
    return work / "demo.coll"


def columns(rows: list[dict], title: str) -> None:
    """One column per run, one line per measure (the rows are too wide for a terminal)."""
    print(f"\n{title}")
    for key in rows[0]:
        cells = [f"{r[key]:.4g}" if isinstance(r[key], float) else str(r[key]) for r in rows]
        print(f"{key:>24}  " + "  ".join(f"{c:>16}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="JPEGs for part 1 (0 skips)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: auto)")
    ap.add_argument("--rerun-files", type=int, default=30_000, help="files for part 2 (0 skips)")
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[1_000_000],
        help="vector counts for part 3 (default: 1M)",
    )
    ap.add_argument(
        "--budgets",
        nargs="*",
        default=["2GB"],
        help="--max-index-memory values for part 3 (default: 2GB)",
    )
    ap.add_argument(
        "--base",
        type=Path,
        default=None,
        help="collection whose embeddings part 3 resamples (default: the demo "
        "images indexed with the demo encoder, once)",
    )
    ap.add_argument("--vector-dtype", default="float16", help="SQLite vectors (default: float16)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    ap.add_argument(
        "--reembed-images", type=int, default=0, help="synthetic JPEGs for part 4 (0 skips)"
    )
    ap.add_argument("--reembed-dir", type=Path, help="a real image folder for part 4 instead")
    ap.add_argument(
        "--cli-runs", type=int, default=3, help="runs of each process in part 5 (0 skips)"
    )
    ap.add_argument("--serve", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    out: dict = {"time": time.time(), "cpus": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.images:
            out["throughput"] = bench_throughput(
                work,
                args.images,
                args.batch_size,
                args.workers if args.workers is not None else min(8, os.cpu_count() or 1),
            )
            table([out["throughput"]], "indexing throughput, resnet18 224 px")
        if args.rerun_files:
            out["rerun"] = bench_rerun(work, args.rerun_files)
            table([out["rerun"]], "unchanged re-run")
        if args.reembed_images or args.reembed_dir:
            out["reembed"] = bench_reembed(
                work,
                args.reembed_dir,
                args.reembed_images,
                args.batch_size,
                args.workers if args.workers is not None else min(8, os.cpu_count() or 1),
            )
            out["reembed"]["folder"] = str(args.reembed_dir or "synthetic 640x480 JPEGs")
            table([out["reembed"]], "index --reembed beside a fresh index, resnet18 64 px")
    if args.sizes or args.cli_runs:
        encoder = ROOT / "app" / "demo" / "encoder"
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            base = args.base or demo_base(Path(tmp), encoder)
            out["search_base"] = str(args.base or "app/demo/images")
            if args.sizes:
                out["search"] = [
                    bench_search(base, encoder, n, limit, args.vector_dtype, Path(tmp))
                    for n in args.sizes
                    for limit in args.budgets
                ]
                columns(out["search"], "search, the index chosen for the budget (k=10, one query)")
            if args.cli_runs:
                out["cli_search"] = bench_cli_search(base, args.cli_runs)
                print(f"\na fresh process, best of {args.cli_runs}: seconds, peak RSS (MB)")
                for r in out["cli_search"]:
                    print(f"{r['process']:>28}  {r['best_s']:8.2f}  {r['rss_mb']:8.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_index_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
