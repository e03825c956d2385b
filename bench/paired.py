"""Is encoder B better than encoder A, or is the difference noise? A paired comparison.

Two encoders measured on the same few hundred validation images each come with an interval
(the probe's 95% CI is about +-5 points on 320 images) that usually holds the other, and yet
one may be right on many more of the queries where the two disagree. This compares them query
by query (``moco.evaluate.evaluate(..., outcomes=True)``), for kNN top-1, probe top-1 and
recall@1:
    A only / B only: the queries only one of them gets right (the discordant pairs),
    p: McNemar's exact test, two-sided (the discordant pairs split as a fair coin would?),
    B - A: the difference in points, with a 95% paired bootstrap interval over the queries.

    python bench/paired.py ENC_A ENC_B --train T --val V
    python bench/paired.py app/demo/encoder runs/x/enc --train T --val V --image-size 32

Prints a table and writes JSON to ``bench/results/paired_<stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METRICS = ("knn", "probe", "recall@1")


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs against Binomial(n, 1/2).

    Examples:
        >>> mcnemar_p(0, 0), round(mcnemar_p(1, 9), 4), round(mcnemar_p(9, 1), 4)
        (1.0, 0.0215, 0.0215)
    """
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(a: np.ndarray, b: np.ndarray, draws: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """The comparison of two per-query right/wrong arrays over the same queries."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    diff = b.astype(float) - a.astype(float)
    idx = np.random.default_rng(seed).integers(0, len(diff), (draws, len(diff)))
    boot = 100.0 * diff[idx].mean(axis=1)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    return {
        "queries": len(diff),
        "a": 100.0 * a.mean(),
        "b": 100.0 * b.mean(),
        "a_only": a_only,
        "b_only": b_only,
        "b_minus_a": 100.0 * diff.mean(),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "p_mcnemar": mcnemar_p(a_only, b_only),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", help="encoder A (the one in place): a directory or baseline spec")
    parser.add_argument("b", help="encoder B (the candidate)")
    parser.add_argument("--train", required=True, help="labelled ImageFolder tree to train on")
    parser.add_argument("--val", required=True, help="labelled ImageFolder tree to measure on")
    parser.add_argument("--image-size", type=int, default=None, help="input size of baselines")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    from moco.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(image_size=args.image_size, monitor_size=0)  # no view recall: unused here
    rows = [evaluate(spec, args.train, args.val, cfg, outcomes=True) for spec in (args.a, args.b)]
    out_a, out_b = rows[0]["outcomes"], rows[1]["outcomes"]
    if out_a["val"] != out_b["val"]:
        sys.exit("the two encoders read different validation images; cannot pair them")
    result = {m: paired(np.array(out_a[m]), np.array(out_b[m])) for m in METRICS}
    print(f"A: {rows[0]['encoder']}\nB: {rows[1]['encoder']}")
    print(
        f"{'metric':10} {'A':>6} {'B':>6} {'A only':>7} {'B only':>7} {'B - A':>6}  95% CI{'':8} p"
    )
    for m, r in result.items():
        lo, hi = r["ci95"]
        print(
            f"{m:10} {r['a']:6.1f} {r['b']:6.1f} {r['a_only']:7d} {r['b_only']:7d} "
            f"{r['b_minus_a']:+6.1f}  [{lo:+5.1f}, {hi:+5.1f}]  {r['p_mcnemar']:.3g}"
        )
    for row in rows:
        row.pop("outcomes")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"paired_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps({"a": rows[0], "b": rows[1], "paired": result}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
