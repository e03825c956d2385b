"""Benchmark of MoCo pretraining: images/s of one training step, and end to end from files.

Prints tables and writes JSON to bench/results/bench_pretrain_<timestamp>.json.

1. Compute only (pre-made tensors), resnet18 (with the stem ``train`` picks), for
   each (image size, batch): the naive step that the official code and lightly run (one fp32 NCHW
   forward+backward of the query encoder, one forward of the key encoder, plain BatchNorm, SGD,
   queue update), beside this project's step with channels_last, split BatchNorm on/off,
   torch.compile, and bf16 autocast (on CUDA, and on CPUs with bf16 units: AMX, AVX-512 BF16).
   Variants are measured in interleaved rounds (each round times every variant once) and the
   median round is kept, so load drift hits all alike. Goal: the default step >= 1.15x naive.
2. End to end: JPEG files -> ``moco.trainset.make_dataset`` (the decoded store, or PIL) -> the
   trainer's loader and augmentation (PIL workers, batched, batched and fused) -> the same
   step, in rounds interleaved with that step on pre-made tensors; the median round's ratio.
   Goal: >= 0.95x of compute only.

Each row also gives TFLOP/s (the step's FLOPs counted once by ``FlopCounterMode``) and, on a GPU
whose dense bf16 peak is in ``PEAK_BF16``, MFU: the share of that peak the step sustains.

Examples:
    python bench/bench_pretrain.py --quick
    python bench/bench_pretrain.py                  # CPU: 64 px batch 64, 224 px batch 32
    python bench/bench_pretrain.py --device cuda    # bf16 + channels_last + compile vs fp32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco.config import TrainConfig
from moco.model import MoCo, ModelConfig, compile_encoders
from moco.recipe import cpu_has_bf16, default_amp
from moco.trainlog import RunLog
from moco.trainset import batches, loader, make_dataset

RESULTS = Path(__file__).resolve().parent / "results"
K = 4096


@dataclass(frozen=True)
class Variant:
    name: str
    naive: bool = False
    channels_last: bool = False
    bn_splits: int = 1
    compile: bool = False
    amp: bool = False


@dataclass
class Runner:
    """A model, its optimizer and a ``step(x1, x2)`` closure for one variant."""

    variant: Variant
    step: Callable[[torch.Tensor, torch.Tensor], None]
    fmt: torch.memory_format
    times: list[float] = field(default_factory=list)
    compile_s: float = 0.0


# Dense bf16 tensor-core peaks (FLOP/s, the vendors' data sheets), most specific name first. MFU
# is quoted against these whatever precision a variant runs in, as PaLM and nanoGPT quote it.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, or None (a CPU, an unlisted GPU): then no MFU is printed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def step_flops(naive: Runner, size: int, batch: int, device: torch.device) -> float:
    """FLOPs of one training step, counted by torch's ``FlopCounterMode`` on the naive step.

    Every variant computes the same convolutions and matmuls (query forward and backward, key
    forward, logits against the queue); split-BN, layouts and precision change their speed,
    not their count. One more step of the naive model changes no timing.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = _inputs(batch, size, device, naive.fmt)
    with FlopCounterMode(display=False) as counter:
        naive.step(x[0], x[1])
    return float(counter.get_total_flops())


def _flops_columns(flops: float, seconds: float, peak: float | None) -> dict[str, float]:
    tflops = flops / seconds / 1e12
    return {"tflops": tflops, **({"mfu": tflops * 1e12 / peak} if peak else {})}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _naive_runner(mcfg: ModelConfig, device: torch.device) -> Callable[..., None]:
    """The step of facebookresearch/moco and lightly, written out: fp32, NCHW, plain BN."""
    model = MoCo(mcfg).to(device)  # only its encoders and queue are used
    enc_q, enc_k = model.encoder_q, model.encoder_k
    opt = torch.optim.SGD(enc_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    queue = model.queue  # CxK
    ptr = [0]

    def step(x1: torch.Tensor, x2: torch.Tensor) -> None:
        q = F.normalize(enc_q(x1), dim=1)  # NxC
        with torch.no_grad():
            for pk, pq in zip(enc_k.parameters(), enc_q.parameters(), strict=True):
                pk.mul_(mcfg.m).add_(pq.detach(), alpha=1 - mcfg.m)
            k = F.normalize(enc_k(x2), dim=1)  # NxC, no shuffle on one device
        l_pos = (q * k).sum(1, keepdim=True)  # Nx1
        l_neg = q @ queue.clone().detach()  # NxK
        logits = torch.cat([l_pos, l_neg], dim=1) / mcfg.T  # Nx(1+K)
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n = k.shape[0]
        queue[:, ptr[0] : ptr[0] + n] = k.T
        ptr[0] = (ptr[0] + n) % mcfg.K

    return step


def _our_runner(v: Variant, mcfg: ModelConfig, device: torch.device) -> Callable[..., None]:
    """The step of ``moco.loop.train_one_epoch``: MoCo.forward under autocast, SGD."""
    model: nn.Module = MoCo(ModelConfig(**{**mcfg.__dict__, "bn_splits": v.bn_splits})).to(device)
    if v.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    if v.compile:
        compile_encoders(model)

    def step(x1: torch.Tensor, x2: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=v.amp):
            loss, _, _ = model(x1, x2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_runner(v: Variant, size: int, device: torch.device) -> Runner:
    # The stem ``train`` picks: CIFAR's at <= 96 px on a GPU, ImageNet's on CPU (moco.recipe).
    small = size <= 96 and device.type != "cpu"
    mcfg = ModelConfig(arch="resnet18", small_stem=small, K=K, bn_splits=1)
    step = _naive_runner(mcfg, device) if v.naive else _our_runner(v, mcfg, device)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    return Runner(v, step, fmt)


def _inputs(batch: int, size: int, device: torch.device, fmt: torch.memory_format) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt)
        for _ in range(2)
    ]


def _time_steps(r: Runner, x: list[torch.Tensor], steps: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        r.step(x[0], x[1])
    _sync(device)
    return (time.perf_counter() - t0) / steps


def compute_only(
    variants: list[Variant],
    size: int,
    batch: int,
    rounds: int,
    steps: int,
    device: torch.device,
    notes: list[str],
) -> list[Runner]:
    runners, inputs = [], {}
    for v in variants:
        torch.manual_seed(0)
        r = make_runner(v, size, device)
        x = inputs.setdefault(r.fmt, _inputs(batch, size, device, r.fmt))
        t0 = time.perf_counter()
        try:
            for _ in range(3 if v.compile else 1):  # warm-up; compile happens here
                _time_steps(r, x, 1, device)
        except Exception as e:  # compile can fail on a machine without a working toolchain
            notes.append(f"{v.name} at {size}px skipped: {type(e).__name__}: {str(e)[:200]}")
            continue
        r.compile_s = time.perf_counter() - t0 if v.compile else 0.0
        runners.append(r)
    for _ in range(rounds):
        for r in runners:
            r.times.append(_time_steps(r, inputs[r.fmt], steps, device))
    return runners


def _write_images(root: Path, n: int, size: int) -> None:
    """JPEGs with photo-like structure: smooth colour fields plus fine noise."""
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((size, size * 3 // 4), Image.BICUBIC)
        a = np.asarray(im, dtype=np.int16) + rng.integers(-12, 12, (size * 3 // 4, size, 3))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / f"{i:05d}.jpg", quality=90)


def end_to_end(
    best: Runner,
    size: int,
    batch: int,
    steps: int,
    workers: int,
    device: torch.device,
    augment: str = "pil",
    rounds: int = 3,
) -> dict[str, Any]:
    """Files -> cache -> augmentation -> step, vs the same step on fixed tensors, interleaved.

    ``augment`` "pil": PIL transforms per image in DataLoader workers (the official design);
    "batch": a uint8 store augmented a batch at a time on ``device`` (moco.batchaug);
    "fused": the same with its elementwise stages compiled (compiling is in the first batch).

    One epoch runs ``rounds`` rounds of: ``steps // rounds`` steps on fixed tensors, then as
    many timed steps from the files. A shared machine's pace drifts by a tenth within minutes,
    so each round's ratio compares neighbours in time; the median round is reported. After
    each compute block the first steps from the files are not timed: the loader read ahead
    during the pause (up to two batches a worker).
    """
    block = max(2, steps // rounds)
    skip = (2 * workers if augment == "pil" else 1) + 1
    n_batches = 1 + rounds * (skip + block)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        n_files = batch * min(n_batches, 12)  # later batches reuse the files: only pace counts
        _write_images(root, n_files, max(2 * size, 256))
        cfg = TrainConfig(
            data=str(root),
            out=str(Path(tmp) / "run"),
            image_size=size,
            batch_size=batch,
            workers=workers,
            cache="on",
            augment="batch" if augment == "fused" else augment,
            store_dir=str(Path(tmp) / "stores"),
            amp=best.variant.amp,  # batched views come as this model takes them, as in a run
            channels_last=best.variant.channels_last,
        )
        paths = sorted(root.iterdir())
        t0 = time.perf_counter()
        ds = make_dataset(cfg, paths)
        cache_s = time.perf_counter() - t0
        x = _inputs(batch, size, device, best.fmt)
        order = [i % n_files for i in range(batch * n_batches)]
        epoch_loader = loader(ds, order, cfg, 1, 0, device=device, fused=augment == "fused")
        runlog = RunLog(Path(tmp) / "run", cfg, paths, enabled=False)
        it = iter(batches(epoch_loader, runlog, device))
        fmt = best.fmt

        def step_from_files() -> None:
            views, _ = next(it)
            best.step(
                views[0].to(device, non_blocking=True, memory_format=fmt),
                views[1].to(device, non_blocking=True, memory_format=fmt),
            )

        t0 = time.perf_counter()
        step_from_files()  # worker start-up, compiling: not steady state
        _sync(device)
        t_first = time.perf_counter() - t0
        compute, e2e = [], []
        for _ in range(rounds):
            compute.append(_time_steps(best, x, block, device))
            for _ in range(skip):
                step_from_files()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                step_from_files()
            _sync(device)
            e2e.append((time.perf_counter() - t0) / block)
        compute.append(_time_steps(best, x, block, device))
        it.close()  # stops the workers before the folder goes
    ratios = [(compute[i] + compute[i + 1]) / 2 / e2e[i] for i in range(rounds)]
    return {
        "variant": best.variant.name,
        "augment": augment,
        "workers": workers if augment == "pil" else 0,
        "rounds": rounds,
        "steps_per_round": block,
        "cache_decode_s": round(cache_s, 2),
        "first_batch_s": round(t_first, 2),
        "e2e_img_s": batch / statistics.median(e2e),
        "compute_img_s": batch / statistics.median(compute),
        "round_ratios": [round(r, 3) for r in ratios],
        "ratio": statistics.median(ratios),
    }


def _memory() -> dict[str, float]:
    """This process's resident memory (MiB): all of it, anonymous, and file-backed (the map)."""
    status = Path("/proc/self/status").read_text().splitlines()
    fields = {k: v for k, _, v in (line.partition(":") for line in status)}
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def store_bench(n: int, size: int, batch: int, workers: int, device: torch.device) -> dict:
    """Build the decoded image store of ``n`` JPEGs, open it again, read one epoch of batched
    views from it, and report the times and the resident memory at the end."""
    from moco.imagestore import open_store, store_side
    from moco.trainset import StoreBatches, batch_augment

    side = store_side(size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        for i in range(n):  # 4:3 photo-like files at about the canvas size
            low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            im = Image.fromarray(low).resize((side, side * 3 // 4), Image.BILINEAR)
            im.save(root / f"{i:06d}.jpg", quality=85)
        write_s = time.perf_counter() - t0
        paths = sorted(root.iterdir())
        where = Path(tmp) / "store"
        before = _memory()
        t0 = time.perf_counter()
        open_store(paths, side, where, workers)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store = open_store(paths, side, where, workers)
        reopen_s = time.perf_counter() - t0
        cfg = TrainConfig(data=str(root), out=tmp, image_size=size, batch_size=batch)
        epoch = StoreBatches(store, list(range(n)), batch, batch_augment(cfg), device, seed=0)
        t0, seen = time.perf_counter(), 0
        for views, _, _ in epoch:
            seen += views[0].shape[0]
        epoch_s = time.perf_counter() - t0
        mem = _memory()
        file_mb = (where / "pixels.u8").stat().st_size / 2**20
    return {
        "images": n,
        "image_size": size,
        "side": side,
        "store_mib": round(file_mb),
        "write_files_s": round(write_s, 1),
        "build_s": round(build_s, 1),
        "build_img_s": round(n / build_s),
        "reopen_s": round(reopen_s, 1),
        "epoch_views_img_s": round(seen / epoch_s),
        **{f"{k}_mib": round(v) for k, v in mem.items()},
        **{f"{k}_mib_before": round(v) for k, v in before.items()},
    }


def variants_for(device: torch.device, compile_ok: bool) -> list[Variant]:
    if device.type == "cuda":
        vs = [
            Variant("naive fp32 NCHW", naive=True),
            Variant("ours fp32 channels_last", channels_last=True),
            Variant("ours bf16 channels_last", channels_last=True, amp=True),
            Variant("ours bf16 cl split-BN", channels_last=True, bn_splits=8, amp=True),
            Variant(
                "ours bf16 cl split-BN compile",
                channels_last=True,
                bn_splits=8,
                amp=True,
                compile=True,
            ),
        ]
    else:
        vs = [
            Variant("naive fp32 NCHW", naive=True),
            Variant("ours NCHW (plain BN)"),
            Variant("ours channels_last", channels_last=True),
            Variant("ours NCHW split-BN", bn_splits=8),
            Variant("ours channels_last split-BN", channels_last=True, bn_splits=8),
            Variant("ours cl split-BN compile", channels_last=True, bn_splits=8, compile=True),
            Variant("ours cl compile", channels_last=True, compile=True),
        ]
        if cpu_has_bf16():  # AMX / AVX-512 BF16: what ``train`` picks from 48 px
            vs.append(Variant("ours bf16 cl split-BN", channels_last=True, bn_splits=8, amp=True))
    return [v for v in vs if compile_ok or not v.compile]


def settings_arg(text: str) -> list[tuple[int, int]]:
    """``"32x64,224x32"`` -> [(32, 64), (224, 32)]."""
    try:
        pairs = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected SIZExBATCH,... such as 32x64, got {text!r}")
    return pairs  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round (sanity check)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3)")
    ap.add_argument("--steps", type=int, default=0, help="steps per round (default: 2 CPU, 10 GPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    ap.add_argument("--workers", type=int, default=0, help="loader workers (default 2; GPU 8)")
    ap.add_argument(
        "--e2e-steps",
        type=int,
        default=0,
        help="end-to-end steps timed, split over the rounds (default 24; GPU 40)",
    )
    ap.add_argument(
        "--e2e-rounds",
        type=int,
        default=0,
        help="end-to-end rounds, each against compute-only (default 3; GPU 1: a lent GPU's "
        "minutes are few, and after each pause PIL's 8 workers refill 16 untimed batches)",
    )
    ap.add_argument("--results", default=str(RESULTS), help=f"JSON folder (default: {RESULTS})")
    ap.add_argument(
        "--settings",
        type=settings_arg,
        default=None,
        metavar="SIZExBATCH,...",
        help="image sizes and batches to measure, e.g. 32x64 (the CPU default of --minutes) "
        "(default: 64x64,224x32, and 224x256 on a GPU)",
    )
    ap.add_argument(
        "--store-images",
        type=int,
        default=0,
        help="instead: build the decoded image store of this many files at 64 px, read an "
        "epoch of views from it, report times and resident memory",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.store_images:
        row = store_bench(args.store_images, 64, 256, args.workers or 2, device)
        print(json.dumps(row, indent=2))
        out = Path(args.results) / f"bench_store_{time.strftime('%Y%m%d_%H%M%S')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(row, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    gpu = device.type == "cuda"
    if args.settings:
        settings = args.settings
    elif args.quick:
        settings = [(32, 16), (64, 16)]
    else:
        settings = [(64, 64), (224, 32)] + ([(224, 256)] if gpu else [])
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (1 if args.quick else 10 if gpu else 2)
    e2e_steps = args.e2e_steps or (3 if args.quick else 40 if gpu else 24)
    e2e_rounds = args.e2e_rounds or (1 if args.quick or gpu else 3)
    workers = args.workers or (8 if gpu else 2)
    compile_ok = not args.no_compile and not (args.quick and not gpu)
    notes: list[str] = []
    if args.quick and not gpu:
        notes.append("--quick on CPU: compile variants skipped")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info = {
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1min_start": load,
        "K": K,
        "rounds": rounds,
        "e2e_rounds": e2e_rounds,
        "steps_per_round": steps,
    }
    peak = peak_flops(device)
    if peak:
        info["peak_bf16_flops"] = peak
    rows: list[dict[str, Any]] = []
    e2e_rows: list[dict[str, Any]] = []
    for size, batch in settings:
        runners = compute_only(
            variants_for(device, compile_ok), size, batch, rounds, steps, device, notes
        )
        naive = statistics.median(runners[0].times)
        flops = step_flops(runners[0], size, batch, device)
        stem = "small stem" if size <= 96 and gpu else "ImageNet stem"
        print(
            f"\n{size} px, batch {batch} ({stem}),"
            f" {device}: images/s (median of {rounds} interleaved rounds x {steps} steps)"
        )
        # The variant train() runs by default on this device at this size (also end to end).
        amp = default_amp(device.type, size)
        default = next(
            (
                r
                for r in runners
                if r.variant.bn_splits > 1
                and r.variant.channels_last
                and not r.variant.compile
                and r.variant.amp == amp
            ),
            runners[-1],
        )
        head = ("variant", "img/s", "ms/step", "vs naive", "TFLOP/s", "MFU", "compile s")
        print("  {:38s} {:>8s} {:>9s} {:>9s} {:>8s} {:>6s} {:>10s}".format(*head))
        for r in runners:
            t = statistics.median(r.times)
            row = {
                "size": size,
                "batch": batch,
                "variant": r.variant.name,
                "img_s": batch / t,
                "ms_step": 1000 * t,
                "vs_naive": naive / t,
                "compile_s": round(r.compile_s, 1),
                "round_ms": [round(1000 * x, 1) for x in r.times],
                "default": r is default,
                "flops_per_step": flops,
                **_flops_columns(flops, t, peak),
            }
            rows.append(row)
            comp = f"{r.compile_s:11.0f}" if r.variant.compile else ""
            name = r.variant.name + (" (default)" if r is default else "")
            mfu = f"{100 * row['mfu']:5.1f}%" if "mfu" in row else f"{'-':>6s}"
            print(
                f"  {name:38s} {batch / t:8.1f} {1000 * t:9.0f} {naive / t:8.2f}x"
                f" {row['tflops']:8.2f} {mfu}{comp}"
            )
        for augment in ("pil", "batch", "fused"):
            e2e = end_to_end(default, size, batch, e2e_steps, workers, device, augment, e2e_rounds)
            e2e |= _flops_columns(flops, batch / e2e["e2e_img_s"], peak)
            e2e_rows.append({"size": size, "batch": batch, **e2e})
            mfu = f", MFU {100 * e2e['mfu']:.1f}%" if "mfu" in e2e else ""
            print(
                f"  end to end, --augment {augment} ({e2e['variant']}, {e2e['workers']} "
                f"workers, cache decode {e2e['cache_decode_s']} s, first batch "
                f"{e2e['first_batch_s']} s): {e2e['e2e_img_s']:.1f} img/s vs compute-only "
                f"{e2e['compute_img_s']:.1f} img/s = {e2e['ratio']:.2f}x, median of rounds "
                f"{e2e['round_ratios']} (goal >= 0.95x); {e2e['tflops']:.2f} TFLOP/s{mfu}"
            )
        del runners
    info["load_avg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for n in notes:
        print("note:", n)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"bench_pretrain_{time.strftime('%Y%m%d_%H%M%S')}_{device.type}.json"
    out.write_text(
        json.dumps(
            {
                "info": info,
                "compute": rows,
                "end_to_end": e2e_rows,
                "notes": notes,
                "quick": args.quick,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
