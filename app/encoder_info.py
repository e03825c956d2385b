"""Encoder-tab handlers: which encoder the collection uses and how it was trained.

The collection's manifest names the encoder (path, content hash, preprocessing); the encoder's
own ``config.json`` adds the training summary that ``moco-search export`` recorded, including
the per-epoch ``log`` of the pretraining run, from which the loss curve is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.context import AppContext
from app.markup import code
from moco import describe_fit, epoch_numbers, read_encoder_config


def training_summary(ctx: AppContext) -> dict[str, Any]:
    """The encoder's recorded training summary, or {} when unknown (e.g. no encoder dir)."""
    path = Path(ctx.collection.manifest["encoder"]["path"])
    try:
        return dict(read_encoder_config(path).training or {})
    except (FileNotFoundError, ValueError, OSError):
        return {}


def fitted(fit: dict[str, Any]) -> str:
    """How ``export --fit`` mapped the features (``moco.whiten``), in words."""
    return describe_fit(fit, code=True) if fit else "not centred"


def encoder_markdown(ctx: AppContext) -> str:
    enc = ctx.collection.manifest["encoder"]
    cfg = enc.get("config", {})
    train = training_summary(ctx)
    log = train.get("log") or []
    lines = [
        f"**Encoder** `{cfg.get('arch')}`{' (small stem)' if cfg.get('small_stem') else ''}, "
        f"{cfg.get('feature_dim')}-d features, input {cfg.get('image_size')} px "
        f"({cfg.get('interpolation')}, crop {cfg.get('crop_pct')}).",
        f"- path: {code(enc.get('path'))}",
        f"- content hash: `{str(enc.get('content_hash', ''))[:16]}`",
        f"- source: {cfg.get('source') or 'unknown'}",
        f"- features: {cfg.get('pooling', 'avg')} pooling, " + fitted(cfg.get("fit") or {}),
    ]
    if log:
        last = log[-1]
        lines.append(
            f"- pretraining: {epoch_numbers(log)[-1]} epochs; last loss "
            f"{last.get('loss', float('nan')):.4f}"
            + (f", kNN top-1 {last['knn_top1']:.1f}%" if "knn_top1" in last else "")
        )
    else:
        lines.append("- pretraining log: not recorded with this encoder")
    return "\n".join(lines)


def loss_curve(ctx: AppContext) -> Any:
    """A DataFrame (epoch, loss) from the training log, or None when there is none."""
    import pandas as pd

    log = training_summary(ctx).get("log") or []
    log = [r for r in log if "loss" in r and "epoch" in r]
    rows = list(zip(epoch_numbers(log), (float(r["loss"]) for r in log), strict=True))
    if not rows:
        return None
    return pd.DataFrame(rows, columns=["epoch", "loss"])


def loss_views(ctx: AppContext) -> tuple[Any, Any]:
    """The Encoder tab's loss plot and its "no log" note, one of them visible."""
    import gradio as gr

    curve = loss_curve(ctx)
    return (
        gr.LinePlot(value=curve, visible=curve is not None),
        gr.Markdown(visible=curve is None),
    )


def config_json(ctx: AppContext) -> str:
    """The encoder config and training settings (without the per-epoch log) as JSON text."""
    train = {k: v for k, v in training_summary(ctx).items() if k != "log"}
    return json.dumps(
        {"encoder": ctx.collection.manifest["encoder"].get("config", {}), "training": train},
        indent=1,
        default=str,
    )
