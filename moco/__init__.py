"""MoCo v1/v2 pretraining, frozen encoder export, and feature evaluation (kNN, linear probe).

Everything ``indexes`` and ``app`` use is exported here (tests/test_layering.py checks they reach
no deeper). The names are imported lazily (PEP 562), as in ``indexes``: ``launch.py`` imports
``moco.cli`` to build its parser, and ``--help`` must not wait for torch and torchvision.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moco.augment import TwoCropsTransform, moco_transform
    from moco.config import KNN_K, KNN_T, TrainConfig
    from moco.data import (
        ENCODER_FILES,
        HEIF_EXTENSIONS,
        IMAGE_EXTENSIONS,
        RUN_FILES,
        ImageError,
        ImageFiles,
        decoder_hint,
        heif_hint,
        list_images,
        load_image,
        open_image,
        walk_files,
    )
    from moco.distributed import default_device, world_size
    from moco.encoder_config import (
        CheckpointError,
        EncoderConfig,
        describe_fit,
        encoder_dir,
        read_encoder_config,
    )
    from moco.encoders import ENCODERS, build_encoder, feature_dim
    from moco.export import export_encoder, load_encoder, save_encoder
    from moco.files import (
        DISK_FULL,
        Busy,
        DiskFullError,
        atomic_file,
        exclusive,
        file_hash,
        file_identity,
        is_within,
        output_folder,
    )
    from moco.flags import add_dataclass_flags, config_from_args, flag
    from moco.knn import knn_predict, knn_top1
    from moco.loss import info_nce, moco_logits, topk_accuracy
    from moco.metrics import (
        ClassificationMetrics,
        classification_metrics,
        retrieval_metrics,
        save_confusion_png,
        stratified_folds,
        stratified_split,
    )
    from moco.model import MoCo, ModelConfig
    from moco.preprocess import eval_transform, resize_side
    from moco.probe import (
        LinearProbe,
        ProbeConfig,
        ProbeMismatchError,
        load_probe,
        save_probe,
        train_probe,
    )
    from moco.probe_meta import read_probe_meta
    from moco.published import resolve_encoder
    from moco.trainlog import epoch_numbers

_WHERE = {
    "Busy": "moco.files",
    "CheckpointError": "moco.encoder_config",
    "ClassificationMetrics": "moco.metrics",
    "DISK_FULL": "moco.files",
    "DiskFullError": "moco.files",
    "ENCODERS": "moco.encoders",
    "EncoderConfig": "moco.encoder_config",
    "ENCODER_FILES": "moco.data",
    "HEIF_EXTENSIONS": "moco.data",
    "RUN_FILES": "moco.data",
    "IMAGE_EXTENSIONS": "moco.data",
    "ImageError": "moco.data",
    "ImageFiles": "moco.data",
    "KNN_K": "moco.config",
    "KNN_T": "moco.config",
    "LinearProbe": "moco.probe",
    "MoCo": "moco.model",
    "ModelConfig": "moco.model",
    "ProbeConfig": "moco.probe",
    "ProbeMismatchError": "moco.probe",
    "TrainConfig": "moco.config",
    "TwoCropsTransform": "moco.augment",
    "add_dataclass_flags": "moco.flags",
    "atomic_file": "moco.files",
    "build_encoder": "moco.encoders",
    "classification_metrics": "moco.metrics",
    "config_from_args": "moco.flags",
    "default_device": "moco.distributed",
    "describe_fit": "moco.encoder_config",
    "epoch_numbers": "moco.trainlog",
    "encoder_dir": "moco.encoder_config",
    "eval_transform": "moco.preprocess",
    "export_encoder": "moco.export",
    "feature_dim": "moco.encoders",
    "file_hash": "moco.files",
    "flag": "moco.flags",
    "heif_hint": "moco.data",
    "decoder_hint": "moco.data",
    "info_nce": "moco.loss",
    "is_within": "moco.files",
    "knn_predict": "moco.knn",
    "knn_top1": "moco.knn",
    "list_images": "moco.data",
    "load_encoder": "moco.export",
    "load_image": "moco.data",
    "open_image": "moco.data",
    "load_probe": "moco.probe",
    "moco_logits": "moco.loss",
    "moco_transform": "moco.augment",
    "exclusive": "moco.files",
    "file_identity": "moco.files",
    "output_folder": "moco.files",
    "read_encoder_config": "moco.encoder_config",
    "read_probe_meta": "moco.probe_meta",
    "resize_side": "moco.preprocess",
    "resolve_encoder": "moco.published",
    "retrieval_metrics": "moco.metrics",
    "save_confusion_png": "moco.metrics",
    "save_encoder": "moco.export",
    "save_probe": "moco.probe",
    "stratified_folds": "moco.metrics",
    "stratified_split": "moco.metrics",
    "topk_accuracy": "moco.loss",
    "train_probe": "moco.probe",
    "walk_files": "moco.data",
    "world_size": "moco.distributed",
}

__all__ = [
    "DISK_FULL",
    "ENCODERS",
    "ENCODER_FILES",
    "HEIF_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "KNN_K",
    "KNN_T",
    "RUN_FILES",
    "Busy",
    "CheckpointError",
    "ClassificationMetrics",
    "DiskFullError",
    "EncoderConfig",
    "ImageError",
    "ImageFiles",
    "LinearProbe",
    "MoCo",
    "ModelConfig",
    "ProbeConfig",
    "ProbeMismatchError",
    "TrainConfig",
    "TwoCropsTransform",
    "add_dataclass_flags",
    "atomic_file",
    "build_encoder",
    "classification_metrics",
    "config_from_args",
    "decoder_hint",
    "default_device",
    "describe_fit",
    "encoder_dir",
    "epoch_numbers",
    "eval_transform",
    "exclusive",
    "export_encoder",
    "feature_dim",
    "file_hash",
    "file_identity",
    "flag",
    "heif_hint",
    "info_nce",
    "is_within",
    "knn_predict",
    "knn_top1",
    "list_images",
    "load_encoder",
    "load_image",
    "load_probe",
    "moco_logits",
    "moco_transform",
    "open_image",
    "output_folder",
    "read_encoder_config",
    "read_probe_meta",
    "resize_side",
    "resolve_encoder",
    "retrieval_metrics",
    "save_confusion_png",
    "save_encoder",
    "save_probe",
    "stratified_folds",
    "stratified_split",
    "topk_accuracy",
    "train_probe",
    "walk_files",
    "world_size",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'moco' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
