"""Quality against the training budget: one PNG from the rows of a quality JSON.

``bench/quality.py`` measures one budget per run; the budget curve (5, 15 and 45 minutes on 2
CPU cores) takes one run per budget, each with its own cosine schedule ending on time, so its
points are separate runs, not checkpoints of one. This script draws them beside the baselines
measured in the same session::

    python bench/plot_budgets.py bench/results/quality_idle_X.json \\
        --series ours=s399_ours32:5,s1197_ours32_paperlr:15,t3591_ours32:45 \\
        --series official=s399_official32:5,m15_official32:15,t3591_official32:45

Rows are matched by ``name`` and the embedding size (``--eval-sizes``); baselines are the rows
named ``baselines``. Writes ``<json stem>_budgets.png`` beside the JSON and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

METRICS = ("instance_R@1", "instance_R@10", "knn_top1", "probe_top1")


def parse_series(text: str) -> tuple[str, list[tuple[str, float]]]:
    label, _, points = text.partition("=")
    out = []
    for item in points.split(","):
        name, _, minutes = item.rpartition(":")
        out.append((name, float(minutes)))
    return label, out


def find(rows: list[dict[str, Any]], name: str, size: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["name"] == name and r.get("image_size") == size), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a quality JSON with a 'rows' list")
    parser.add_argument("--series", action="append", required=True, help="LABEL=NAME:MIN,...")
    parser.add_argument("--eval-sizes", default="32,64", help="embedding sizes, one plot row each")
    args = parser.parse_args()
    rows = json.loads(args.json.read_text())["rows"]
    sizes = [int(s) for s in args.eval_sizes.split(",")]
    series = [parse_series(s) for s in args.series]
    baselines = [r for r in rows if r["name"] == "baselines"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(sizes), len(METRICS), figsize=(16, 3.4 * len(sizes)), squeeze=False
    )
    table = []
    for i, size in enumerate(sizes):
        for j, metric in enumerate(METRICS):
            ax = axes[i][j]
            for b in baselines:
                if b["spec"] != "pixels" and b["image_size"] != size:
                    continue  # the random network at this row's size; pixels at both
                label = f"{b['spec']} {b['image_size']}px"
                grey = b["spec"] == "pixels"
                ax.axhline(b[metric], ls="--", lw=1, color="grey" if grey else "black", label=label)
            for label, points in series:
                pts = [(m, find(rows, name, size)) for name, m in points]
                pts = [(m, r) for m, r in pts if r is not None]
                ax.plot([m for m, _ in pts], [r[metric] for _, r in pts], marker="o", label=label)
                if j == 0:
                    for m, r in pts:
                        table.append((size, label, m, *(r[k] for k in METRICS)))
            ax.set(title=f"{metric}, embedded at {size} px", xlabel="minutes of training (idle)")
            ax.set_xlim(left=0)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    out = args.json.with_name(args.json.stem + "_budgets.png")
    fig.savefig(out, dpi=80)
    print("| embedded at | recipe | minutes | " + " | ".join(METRICS) + " |")
    print("|---" * (3 + len(METRICS)) + "|")
    for size, label, m, *vals in table:
        print(f"| {size} px | {label} | {m:g} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
