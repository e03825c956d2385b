"""Does pretraining help? Raw pixels, a random-init encoder and MoCo encoders on real images.

Runs ``moco-search eval`` (kNN, linear probe, retrieval, label-free view recall) on the demo's
fixed held-out split (Fluent Emoji 3D, 8 categories, shipped in app/demo/images) for each encoder,
prints a table, writes JSON and a bar chart to bench/results/. Add your own encoders (for
example the checkpoints of a longer run, exported) as arguments:

    python bench/quality.py                        # pixels, random init, the shipped encoder
    python bench/quality.py runs/r1/encoder ...    # and more encoder directories
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from app.demo.split import write_split
from moco.evaluate import EvalConfig, evaluate_many, format_table, write_json
from moco.probe import ProbeConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "app" / "demo" / "encoder"


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["knn_top1", "probe_top1", "mAP@10", "recall@1", "view_recall@1"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [row.get(m, 0) for m in metrics], width, label=row["encoder"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
    ax.set(ylabel="%", title="demo held-out split (higher is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("encoders", nargs="*", help="more encoder directories to compare")
    parser.add_argument("--image-size", type=int, default=64, help="pixels (default: 64)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                        help="output folder (default: bench/results)")
    args = parser.parse_args()
    specs = ["pixels", "random:resnet18", str(SHIPPED), *args.encoders]
    cfg = EvalConfig(probe=ProbeConfig.preset("fast"), image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        write_split(Path(tmp))
        rows = evaluate_many(specs, Path(tmp) / "train", Path(tmp) / "val", cfg)
    print(format_table(rows))
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    print(f"wrote {write_json(rows, args.results / f'quality_{stamp}.json')}")
    print(f"wrote {plot(rows, args.results / f'quality_{stamp}.png')}")


if __name__ == "__main__":
    main()
