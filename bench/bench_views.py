"""A/B of the batched augmentation across commits: the time of one batch's two views.

Loads ``moco/batchaug.py`` as it was at each git revision given (``WORK``: the working tree)
and times ``BatchAugment`` on the same random canvases, the versions interleaved round by round
so the machine's drift hits all alike; prints the median round of each and writes JSON to
bench/results/bench_views_<timestamp>.json. Canvases are laid out as the store held them at
each version (channels first before store version 2, channels last since).

Examples:
    python bench/bench_views.py --revs ddaf6b4,WORK
    python bench/bench_views.py --revs HEAD~1,WORK --settings 224x32 --eager
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from moco.imagestore import store_side

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def load(rev: str) -> types.ModuleType:
    """``moco.batchaug`` as of ``rev``, as a module of its own (its own compiled stages)."""
    path = ROOT / "moco" / "batchaug.py"
    if rev == "WORK":
        src = path.read_text()
    else:
        cmd = ["git", "-C", str(ROOT), "show", f"{rev}:moco/batchaug.py"]
        src = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    name = f"batchaug_at_{rev.replace('~', '_').replace('^', '_')}"
    module = types.ModuleType(name)
    module.__file__ = f"{name}.py"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(src, module.__file__, "exec"), module.__dict__)
    return module


def channels_last(module: types.ModuleType, rev: str) -> bool:
    """Whether the store at ``rev`` held its slots channels last (store version 2)."""
    if rev == "WORK":
        src = (ROOT / "moco" / "imagestore.py").read_text()
    else:
        cmd = ["git", "-C", str(ROOT), "show", f"{rev}:moco/imagestore.py"]
        src = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return "VERSION = 1\n" not in src


def two_views(aug: object, images: torch.Tensor, sizes: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(1)
    aug(images, sizes, gen), aug(images, sizes, gen)  # type: ignore[operator]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--revs", default="HEAD,WORK", help="git revisions, comma-separated")
    ap.add_argument("--settings", default="64x64,224x32", help="SIZExBATCH, comma-separated")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--eager", action="store_true", help="unfused (the short-run path)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    revs = args.revs.split(",")
    modules = {rev: load(rev) for rev in revs}
    rows = []
    for setting in args.settings.split(","):
        size, batch = (int(v) for v in setting.split("x"))
        side = store_side(size)
        g = torch.Generator().manual_seed(0)
        hwc = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, generator=g)
        sizes = torch.tensor([[side * 3 // 4, side]] * batch)  # 4:3 photos
        cases = {}
        for rev, m in modules.items():
            images = hwc.permute(0, 3, 1, 2)
            images = images if channels_last(m, rev) else images.contiguous()
            cases[rev] = (m.BatchAugment(size, fused=not args.eager), images)

        for rev in revs:  # compile, warm up
            for _ in range(3):
                two_views(*cases[rev], sizes)
        times: dict[str, list[float]] = {rev: [] for rev in revs}
        for _ in range(args.rounds):
            for rev in revs:
                t = time.perf_counter()
                two_views(*cases[rev], sizes)
                times[rev].append((time.perf_counter() - t) * 1e3)
        print(f"\n{size} px, batch {batch}: two views, ms (median of {args.rounds} rounds)")
        for rev in revs:
            med = sorted(times[rev])[len(times[rev]) // 2]
            print(f"  {rev:12s} {med:8.1f}")
            rows.append(dict(size=size, batch=batch, rev=rev, ms=med, rounds=times[rev]))
    out = Path(args.results) / f"bench_views_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(torch=torch.__version__, threads=torch.get_num_threads(), eager=args.eager)
    out.write_text(json.dumps(dict(info=info, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
