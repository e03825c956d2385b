"""``moco-search ablate``: the MoCo paper's two ablations, run on the user's own folder.

Figure 3 of the paper compares the three mechanisms (end-to-end, memory bank, MoCo) as the
dictionary size K grows, and its momentum table varies MoCo's m at one K. ``ablate`` runs that
grid as ordinary ``pretrain`` runs, one cell after another, each with the same budget (epochs
or ``--minutes``) and the same flags otherwise, and measures every cell the way ``pretrain``
does: the label-free monitor (augmented copies found among held-out images) and, with
``--val-dir``, kNN top-1. It writes ``ablation.md``, ``ablation.json`` and ``ablation.png``.

Each cell is a run folder under ``OUT/cells``; a finished cell leaves ``result.json``, so an
interrupted grid continues where it stopped (an interrupted cell resumes from its checkpoint).
End-to-end's dictionary is its batch: its cell at K trains with a batch of K images (K - 1
negatives), as in the paper, and is left out where K exceeds the images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.checkpoint import LAST
from moco.config import MECHANISMS, TrainConfig, queue_only_flags
from moco.files import output_folder
from moco.recipe import check_ranges

log = logging.getLogger(__name__)

PAPER_K = {  # ResNet-50, ImageNet linear top-1 (%), Figure 3 of the paper
    "end-to-end": {256: 54.9, 512: 56.3, 1024: 57.3},
    "memory-bank": {256: 50.0, 512: 52.0, 1024: 54.1, 4096: 56.5, 16384: 57.8, 65536: 58.0},
    "moco": {256: 54.7, 512: 56.4, 1024: 57.5, 4096: 59.0, 16384: 60.4, 65536: 60.6},
}
PAPER_M = {0.0: None, 0.9: 55.2, 0.99: 57.8, 0.999: 59.0, 0.9999: 58.9}  # K = 4096; m=0 fails
LABEL = {"end-to-end": "end-to-end", "memory-bank": "memory bank", "moco": "MoCo"}


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a mechanism at dictionary size K, and for MoCo's table a momentum."""

    mechanism: str
    K: int
    m: float | None = None  # None: the recipe's momentum and schedule; else constant m

    @property
    def name(self) -> str:
        return f"{self.mechanism}_K{self.K}" + ("" if self.m is None else f"_m{self.m:g}")

    def describe(self) -> str:
        return f"{LABEL[self.mechanism]} K={self.K}" + ("" if self.m is None else f" m={self.m:g}")


def default_ks(num_images: int) -> tuple[int, ...]:
    """Powers of two from 16 to a quarter of the images (at most 6 of them, the largest kept)."""
    ks, k = [], 16
    while k <= max(num_images // 4, 16):
        ks.append(k)
        k *= 2
    return tuple(ks[-6:])


def grid(
    mechanisms: tuple[str, ...],
    ks: tuple[int, ...],
    momenta: tuple[float, ...],
    momentum_k: int,
    num_images: int,
) -> list[Cell]:
    """The K table (every mechanism at every K that fits) and MoCo's momentum table at one K."""
    for mech in mechanisms:
        if mech not in MECHANISMS:
            raise ValueError(f"Unknown mechanism {mech!r}; valid: {', '.join(MECHANISMS)}")
    cells = [
        Cell(mech, k)
        for mech in mechanisms
        for k in ks
        if not (mech == "end-to-end" and k > num_images)  # the batch is the dictionary
    ]
    return cells + [Cell("moco", momentum_k, m) for m in momenta]


def cell_config(base: TrainConfig, cell: Cell, out: Path) -> TrainConfig:
    """``base`` with the cell's mechanism, K (end-to-end: the batch) and momentum."""
    changes: dict[str, Any] = {"mechanism": cell.mechanism, "out": str(out), "moco_k": cell.K}
    if cell.mechanism == "end-to-end":
        changes["batch_size"] = cell.K
    if cell.m is not None:
        changes.update(moco_m=cell.m, m_schedule="constant")
    return dataclasses.replace(base, **changes)


def run_cell(base: TrainConfig, cell: Cell, out: Path) -> dict[str, Any]:
    """Train one cell (or resume it) and return its result; ``result.json`` marks it done."""
    from moco.loop import TrainingDiverged
    from moco.train import train
    from moco.trainlog import read_log

    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = cell_config(base, cell, out)
    if (out / LAST).is_file():
        cfg = dataclasses.replace(cfg, resume=True)
        log.info("%s: resuming the interrupted run in %s", cell.describe(), out)
    result: dict[str, Any] = {"cell": cell.name, **dataclasses.asdict(cell)}
    try:
        train(cfg)
    except TrainingDiverged as e:  # a result too: the paper's m = 0 fails this way
        result["error"] = f"diverged: {e}"
    else:
        rows = read_log(out)
        last = rows[-1]
        keys = ("view_recall", "untrained_view_recall", "knn_top1", "untrained_knn_top1")
        result |= {k: last[k] for k in keys if k in last}
        result |= {
            "loss": last["loss"],
            "contrastive_acc": last["contrastive_acc"],
            "epochs": len(rows),
            "minutes": round(last["elapsed_s"] / 60, 2),
            "batch_size": json.loads((out / "config.json").read_text())["batch_size"],
        }
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary(result: dict[str, Any]) -> str:
    """``finds augmented copies 21.3% (untrained 9.4%), kNN 44.0%, 1.2 min``."""
    if "error" in result:
        return result["error"]
    text = (
        f"finds augmented copies {result['view_recall']:.1f}% "
        f"(untrained {result['untrained_view_recall']:.1f}%)"
        if "view_recall" in result
        else f"loss {result['loss']:.3f}"
    )
    if "knn_top1" in result:
        text += f", kNN {result['knn_top1']:.1f}%"
    return text + f", {result['minutes']:.1f} min"


def metric(results: list[dict[str, Any]]) -> tuple[str, str]:
    """The figure the tables show: kNN top-1 when measured, else the label-free monitor."""
    if any("knn_top1" in r for r in results):
        return "knn_top1", "kNN top-1 (%)"
    return "view_recall", "augmented copies found (%)"


def _value(r: dict[str, Any] | None, key: str) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "diverged"
    return f"{r[key]:.1f}" if key in r else "-"


def markdown(results: list[dict[str, Any]], ks: tuple[int, ...], momentum_k: int) -> str:
    """The two tables in the paper's layout, with the paper's ImageNet numbers beneath."""
    key, title = metric(results)
    by = {(r["mechanism"], r["K"], r["m"]): r for r in results}
    mechs = [m for m in ("end-to-end", "memory-bank", "moco") if any(k[0] == m for k in by)]
    lines = [f"### Dictionary size K: {title}", "", "| K | " + " | ".join(map(str, ks)) + " |"]
    lines.append("|---" * (len(ks) + 1) + "|")
    for mech in mechs:
        row = [_value(by.get((mech, k, None)), key) for k in ks]
        lines.append(f"| {LABEL[mech]} | " + " | ".join(row) + " |")
    momenta = sorted(m for (mech, k, m) in by if m is not None and k == momentum_k)
    if momenta:
        lines += ["", f"### MoCo momentum m at K = {momentum_k}: {title}", ""]
        lines.append("| m | " + " | ".join(f"{m:g}" for m in momenta) + " |")
        lines.append("|---" * (len(momenta) + 1) + "|")
        lines.append(
            "| MoCo | " + " | ".join(_value(by[("moco", momentum_k, m)], key) for m in momenta)
        )
        lines[-1] += " |"
    untrained = [r[f"untrained_{key}"] for r in results if f"untrained_{key}" in r]
    if untrained:
        lines += ["", f"The untrained network: {untrained[0]:.1f}."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], ks: tuple[int, ...], momentum_k: int, path: Path) -> None:
    """Figure 3's layout (metric against K, one line per mechanism) beside the momentum table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, title = metric(results)
    ok = [r for r in results if key in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    untrained = [r[f"untrained_{key}"] for r in ok if f"untrained_{key}" in r]
    for ax in (left, right) if untrained else ():
        ax.axhline(untrained[0], ls="--", lw=1, color="grey", label="untrained network")
    for mech in ("end-to-end", "memory-bank", "moco"):
        pts = sorted((r["K"], r[key]) for r in ok if r["mechanism"] == mech and r["m"] is None)
        if pts:
            left.plot(*zip(*pts, strict=True), marker="o", label=LABEL[mech])
    left.set_xscale("log", base=2)
    left.set(xlabel="K (negatives)", ylabel=title, title="mechanisms")
    left.minorticks_off()
    left.set_xticks(list(ks), [str(k) for k in ks])
    left.legend()
    pts = sorted((r["m"], r[key]) for r in ok if r["m"] is not None and r["K"] == momentum_k)
    if pts:
        names = [f"{m:g}" for m, _ in pts]
        right.plot(names, [v for _, v in pts], marker="o")
    right.set(xlabel="momentum m", ylabel=title, title=f"MoCo, K = {momentum_k}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablate(
    base: TrainConfig,
    mechanisms: tuple[str, ...] = MECHANISMS,
    ks: tuple[int, ...] = (),
    momenta: tuple[float, ...] = (0.0, 0.9, 0.99, 0.999, 0.9999),
    momentum_k: int = 0,
) -> dict[str, Any]:
    """Run (or continue) the grid in ``base.out``; write the tables and the plot there.

    ``ks`` empty: powers of two up to a quarter of the images; ``momentum_k`` 0: the K of
    the grid nearest the recipe's (a tenth of the images).
    """
    from moco.data import list_images

    queue_only = queue_only_flags(base)
    if queue_only and set(mechanisms) - {"moco"}:
        # Refused before the first cell rather than at the first cell of another mechanism.
        raise ValueError(
            f"{' and '.join(queue_only)} apply to MoCo's queue only; pass --mechanisms moco "
            "to ablate with them"
        )
    num_images = len(list_images(base.data))
    if num_images == 0:
        raise ValueError(f"No images found in {base.data}")
    ks = tuple(sorted(set(ks))) or default_ks(num_images)  # --k 8,8 trained K = 8 twice
    momenta = tuple(sorted(set(momenta)))
    momentum_k = momentum_k or min(ks, key=lambda k: abs(k - num_images / 10))
    cells = grid(mechanisms, ks, momenta, momentum_k, num_images)
    out = Path(base.out)
    for cell in cells:  # before the first cell: --momentum 1.5 failed after the K table trained
        check_ranges(cell_config(base, cell, out / "cells" / cell.name))
    (output_folder(out) / "cells").mkdir(exist_ok=True)
    results = []
    for i, cell in enumerate(cells, 1):
        finished = (out / "cells" / cell.name / "result.json").is_file()
        result = run_cell(base, cell, out / "cells" / cell.name)
        results.append(result)
        note = " (done earlier)" if finished else ""
        log.info("cell %d/%d %s%s: %s", i, len(cells), cell.describe(), note, summary(result))
    report = {
        "data": base.data,
        "images": num_images,
        "ks": list(ks),
        "momentum_k": momentum_k,
        "budget": f"{base.minutes:g} minutes" if base.minutes else f"{base.epochs} epochs",
        "paper": {"K": PAPER_K, "m": {str(k): v for k, v in PAPER_M.items()}},
        "cells": results,
    }
    (out / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "ablation.md").write_text(markdown(results, ks, momentum_k))
    plot(results, ks, momentum_k, out / "ablation.png")
    return report
