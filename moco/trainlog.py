"""What a pretraining run reports: progress bar, ``log.jsonl``, TensorBoard, skipped files, plot.

Only rank 0 writes (``enabled``); other ranks get a silent log so the loop has no branches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moco.config import TrainConfig
from moco.files import atomic_file, output_folder

log = logging.getLogger(__name__)


class RunLog:
    def __init__(
        self, out: Path, cfg: TrainConfig, paths: list[Path], enabled: bool = True
    ) -> None:
        self.out, self.cfg, self.paths, self.enabled = out, cfg, paths, enabled
        self.bad = self._listed_skipped()  # a resumed run's: listed once, counted in each row
        self._tb: Any = None
        self._rows: list[dict[str, Any]] = []  # epochs not yet in log.jsonl
        if enabled:
            output_folder(out)
            (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    @property
    def tb(self) -> Any:
        if self._tb is None and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = False
        return self._tb

    def progress(self, epoch: int, total: int, initial: int = 0) -> tqdm:
        return tqdm(
            total=total,
            initial=initial,
            disable=not self.enabled,
            unit="step",
            leave=False,
            desc=self.epoch_label(epoch),
            dynamic_ncols=True,
        )

    def epoch_label(self, epoch: int) -> str:
        """``epoch 3/12``: of the epochs planned now (``--minutes`` plans them as it goes)."""
        return f"epoch {epoch + 1}/{self.cfg.epochs}"

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.tb and global_step % 10 == 0:
            self.tb.add_scalar("train/loss", loss, global_step)
            self.tb.add_scalar("train/lr", lr, global_step)

    def _listed_skipped(self) -> set[int]:
        listed = self.out / "skipped.txt"
        if not listed.is_file():
            return set()
        # file names as the file system has them: bytes that are not UTF-8 round-trip
        names = set(listed.read_text("utf-8", errors="surrogateescape").splitlines())
        return {i for i, p in enumerate(self.paths) if str(p) in names}

    def skipped(self, indexes: list[int]) -> None:
        new = [i for i in indexes if i not in self.bad]
        self.bad.update(new)
        if self.enabled and new:
            with open(
                self.out / "skipped.txt", "a", encoding="utf-8", errors="surrogateescape"
            ) as f:
                f.writelines(f"{self.paths[i]}\n" for i in new)

    def elapsed_before(self) -> float:
        """Seconds the run had trained when it was last logged (0 for a new run), so that a
        resumed run's ``elapsed_s`` goes on counting the run's time instead of restarting."""
        rows = read_log(self.out)
        return float(rows[-1].get("elapsed_s", 0.0)) if rows else 0.0

    def record(self, epoch: int, stats: dict[str, float]) -> None:
        """Hold an epoch's row until ``report`` writes it to ``log.jsonl``.

        The train loop records the row *before* it saves that epoch's checkpoint and reports
        after: a Ctrl-C between the two then still finds the row waiting, and ``close`` writes
        it beside the checkpoint that holds its epoch, while a save that fails (a full disk)
        leaves it unwritten, so the log is never ahead of the checkpoint a resume starts from.
        """
        if not self.enabled:
            return
        self._rows.append({"epoch": epoch + 1, **stats, "skipped_files": len(self.bad)})
        if self.tb:
            for k, v in stats.items():
                self.tb.add_scalar(f"epoch/{k}", v, epoch + 1)

    def pending(self) -> list[dict[str, Any]]:
        """The rows recorded but not yet in ``log.jsonl``: each checkpoint carries them, so a
        log write that never happened (a full disk after the checkpoint fitted, a kill between
        the two) is made good by ``restore`` at the resume."""
        return [dict(r) for r in self._rows]

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Write the rows a resumed checkpoint carries that ``log.jsonl`` lacks (those after
        its last epoch), so the log ends at the checkpoint's epoch again."""
        if not self.enabled or not rows:
            return
        last = max(epoch_numbers(read_log(self.out)), default=0)
        self._rows = [r for r in rows if int(r["epoch"]) > last] + self._rows
        self.flush()

    def report(self, epoch: int, stats: dict[str, float]) -> None:
        """Write the rows recorded so far to ``log.jsonl`` and print this epoch's line."""
        if not self.enabled:
            return
        self.flush()
        knn = f", kNN top-1 {stats['knn_top1']:.1f}%" if "knn_top1" in stats else ""
        log.info(
            "epoch %d/%d: loss %.4f, contrastive acc %.1f%%, %.0f img/s, lr %.4g%s",
            epoch + 1,
            self.cfg.epochs,
            stats["loss"],
            stats["contrastive_acc"],
            stats["images_per_s"],
            stats["lr"],
            knn,
        )

    def flush(self) -> None:
        """Append the waiting rows to ``log.jsonl`` (epochs counted from 1, as printed).

        The file is rewritten whole (``atomic_file``) rather than appended to: a full disk
        mid-append would leave half a row, which every reader of the log (a resume among them)
        would then fail to parse. One row an epoch keeps the rewrite small.
        """
        if self._rows:
            path = self.out / "log.jsonl"
            old = path.read_bytes() if path.is_file() else b""
            new = "".join(json.dumps(row) + "\n" for row in self._rows).encode()
            with atomic_file(path) as tmp:
                tmp.write_bytes(old + new)
            self._rows.clear()
        if self.tb:
            self.tb.flush()

    def close(self) -> None:
        """Flush (an interrupted run's checkpoint holds every finished epoch) and close."""
        if self.enabled:
            self.flush()
        if self.tb:
            self.tb.close()

    def finish(self) -> None:
        """Close TensorBoard and draw the loss (and accuracy) curve to ``curves.png``."""
        self.close()
        if self.enabled and (self.out / "log.jsonl").is_file():
            plot_run(self.out)


def discard_run_outputs(out: Path) -> None:
    """Remove what a run wrote as it trained (``log.jsonl``, ``skipped.txt``, ``tb/``), for a run
    that starts again in its own directory: its rows, skipped files and TensorBoard curves would
    otherwise mix with the new run's, at the same step numbers."""
    for name in ("log.jsonl", "skipped.txt"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)


def read_log(run: Path) -> list[dict[str, Any]]:
    """The rows of ``run``'s ``log.jsonl``, one per reported epoch ([] before the first)."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


LOG_ROWS = 200
"""Epochs an exported encoder's log keeps: enough for its curves. A long run on few images logs
thousands (the demo encoder's 100 minutes on 1,274 images: 2,189, an 870 KB config.json)."""


def thin_log(rows: list[dict[str, Any]], keep: int = LOG_ROWS) -> list[dict[str, Any]]:
    """At most ``keep`` of ``rows`` in order: the first and the last, up to half of them the
    epochs that ran the monitors (kNN, augmented copies), the rest evenly spaced.

    Examples:
        >>> [r["epoch"] for r in thin_log([{"epoch": e} for e in range(1, 11)], keep=4)]
        [1, 4, 7, 10]
    """
    if len(rows) <= keep:
        return rows

    def spaced(idx: list[int], n: int) -> list[int]:
        if len(idx) <= n:
            return idx
        return [idx[round(i * (len(idx) - 1) / max(n - 1, 1))] for i in range(n)]

    monitored = spaced(
        [i for i, r in enumerate(rows) if "knn_top1" in r or "view_recall" in r], keep // 2
    )
    chosen = set(monitored) | set(spaced(list(range(len(rows))), keep - len(monitored)))
    return [rows[i] for i in sorted(chosen)]


def epoch_numbers(rows: list[dict[str, Any]]) -> list[int]:
    """Each ``log.jsonl`` row's epoch, counted from 1 as every message counts them.

    Logs written before epochs were 1-based (the shipped demo encoder's among them) counted
    from 0, and their first row says so.
    """
    shift = 1 if rows and min(int(r["epoch"]) for r in rows) == 0 else 0
    return [int(r["epoch"]) + shift for r in rows]


def plot_run(run: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(run)
    epochs = epoch_numbers(rows)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(epochs, [r["loss"] for r in rows], marker=".")
    ax[0].set(xlabel="epoch", ylabel="InfoNCE loss", title="training loss")
    ax[1].plot(epochs, [r["contrastive_acc"] for r in rows], marker=".", label="contrastive acc")
    monitored = [(e, r["knn_top1"]) for e, r in zip(epochs, rows, strict=True) if "knn_top1" in r]
    if monitored:  # at the epochs that ran the monitor (moco.train.REPORT_SECONDS)
        ax[1].plot(*zip(*monitored, strict=True), marker=".", label="kNN top-1 (val)")
    ax[1].set(xlabel="epoch", ylabel="%", title="accuracy")
    ax[1].legend()
    from matplotlib.ticker import MaxNLocator

    for a in ax:  # epochs are whole numbers: no tick at 2.5
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = run / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
