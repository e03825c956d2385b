"""MoCo v1/v2 pretraining, frozen encoder export, and feature evaluation (kNN, linear probe).

The public names are imported lazily (PEP 562), as in ``indexes``: ``launch.py`` imports
``moco.cli`` to build its parser, and ``--help`` must not wait for torch and torchvision.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moco.augment import TwoCropsTransform, eval_transform, moco_transform
    from moco.data import IMAGE_EXTENSIONS, ImageError, ImageFiles, list_images, load_image
    from moco.encoders import ENCODERS, build_encoder, feature_dim
    from moco.export import (
        CheckpointError,
        EncoderConfig,
        export_encoder,
        load_encoder,
        read_encoder_config,
        save_encoder,
    )
    from moco.loss import info_nce, moco_logits, topk_accuracy
    from moco.model import MoCo, ModelConfig

_WHERE = {
    "CheckpointError": "moco.export",
    "ENCODERS": "moco.encoders",
    "EncoderConfig": "moco.export",
    "IMAGE_EXTENSIONS": "moco.data",
    "ImageError": "moco.data",
    "ImageFiles": "moco.data",
    "MoCo": "moco.model",
    "ModelConfig": "moco.model",
    "TwoCropsTransform": "moco.augment",
    "build_encoder": "moco.encoders",
    "eval_transform": "moco.augment",
    "export_encoder": "moco.export",
    "feature_dim": "moco.encoders",
    "info_nce": "moco.loss",
    "list_images": "moco.data",
    "load_encoder": "moco.export",
    "load_image": "moco.data",
    "moco_logits": "moco.loss",
    "moco_transform": "moco.augment",
    "read_encoder_config": "moco.export",
    "save_encoder": "moco.export",
    "topk_accuracy": "moco.loss",
}

__all__ = [
    "ENCODERS",
    "IMAGE_EXTENSIONS",
    "CheckpointError",
    "EncoderConfig",
    "ImageError",
    "ImageFiles",
    "MoCo",
    "ModelConfig",
    "TwoCropsTransform",
    "build_encoder",
    "eval_transform",
    "export_encoder",
    "feature_dim",
    "info_nce",
    "list_images",
    "load_encoder",
    "load_image",
    "moco_logits",
    "moco_transform",
    "read_encoder_config",
    "save_encoder",
    "topk_accuracy",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'moco' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
