"""Schedules at their start, middle and end; the time budget's arithmetic."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from moco.recipe import Budget, auto_config, auto_splits, check_config
from moco.schedule import Schedule, cosine_lr, cosine_momentum, steps_in_budget
from moco.train import TrainConfig


def test_cosine_momentum_rises_from_base_to_one() -> None:
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 150, 100) == pytest.approx(1.0)  # past the end: stays at 1


def test_cosine_lr_with_warmup() -> None:
    assert cosine_lr(0.3, 0, 100, warmup=10) == 0.0
    assert cosine_lr(0.3, 5, 100, warmup=10) == pytest.approx(0.15)
    assert cosine_lr(0.3, 10, 100, warmup=10) == pytest.approx(0.3)
    assert cosine_lr(0.3, 55, 100, warmup=10) == pytest.approx(0.15)
    assert cosine_lr(0.3, 100, 100, warmup=10) == pytest.approx(0.0)


def test_steps_in_budget_counts_each_epoch_end() -> None:
    assert steps_in_budget(100.0, 1.0, 10, 0.0) == 100
    assert steps_in_budget(100.0, 1.0, 10, 10.0) == 45  # (100 - 10) / (1 + 10 / 10)
    assert steps_in_budget(5.0, 1.0, 10, 10.0) == 0


def test_budget_plans_from_the_median_step() -> None:
    b = Budget(seconds=1e6)
    b.step_times = [5.0, 1.0, 1.0, 1.0, 9.0]  # the first and an outlier do not set the pace
    assert b.step_seconds() == 1.0
    total = b.plan(done_steps=5, steps_per_epoch=100)
    assert total == pytest.approx(5 + (1e6 - 2.0) / 1.02, rel=1e-3)


def test_budget_replans_once_the_first_epoch_boundary_is_timed() -> None:
    """The first plan guesses 2 s an epoch boundary; the first one timed re-plans at once (a
    tiny run crosses one every few steps, and waiting 25 steps once cut it short by a fifth)."""
    b = Budget(seconds=100.0)
    b.step_times = [1.0] * 10
    assert b.due(10)
    guessed = b.plan(done_steps=10, steps_per_epoch=4)
    assert not b.due(11)
    b.gaps.append(1.1)  # a boundary timed: 0.1 s more than a step, not 2 s
    assert b.due(12)
    assert b.plan(done_steps=12, steps_per_epoch=4) > guessed
    assert not b.due(13) and not b.due(36) and b.due(37)


def test_auto_config_fits_the_data_and_the_device() -> None:
    cfg = auto_config(TrainConfig(data="d", out="o"), num_images=8809, device_type="cpu")
    assert (cfg.image_size, cfg.small_stem, cfg.batch_size) == (32, False, 128)
    assert cfg.moco_k == 881 and cfg.moco_m == 0.99
    gpu = auto_config(TrainConfig(data="d", out="o"), num_images=8809, device_type="cuda")
    assert gpu.image_size == 224 and gpu.batch_size == 256
    tiny = auto_config(TrainConfig(data="d", out="o"), num_images=32, device_type="cpu")
    assert tiny.batch_size == 8 and tiny.moco_k == 8  # 4 steps an epoch; K at least a batch
    # an eighth of the images, in whole split-BN groups of 8 on every process
    assert auto_config(TrainConfig(data="d", out="o"), 567, "cpu").batch_size == 64
    assert auto_config(TrainConfig(data="d", out="o"), 567, "cpu", world=3).batch_size == 48
    few = auto_config(TrainConfig(data="d", out="o"), 100, "cpu", world=3)  # 12: below 3 x 8
    assert few.batch_size == 12 and check_config(few, 100, world=3).batch_size == 12
    mine = auto_config(TrainConfig(data="d", out="o", moco_k=65536, image_size=64), 100, "cpu")
    assert mine.moco_k == 65536 and mine.image_size == 64  # what the user sets is kept


def test_key_batchnorm_groups_hold_at_least_four_images() -> None:
    assert [auto_splits(n) for n in (256, 32, 16, 8, 70, 6, 1)] == [8, 8, 4, 2, 2, 1, 1]
    given = auto_config(TrainConfig(data="d", out="o", batch_size=8, bn_splits=8), 32, "cpu")
    with pytest.raises(ValueError, match="groups of one image, and BatchNorm over one image"):
        check_config(given, 32)
    assert check_config(dataclasses.replace(given, bn_splits=4), 32).bn_splits == 4  # pairs
    # --adapt shrinks a batch larger than the folder, and its groups with it
    big = dataclasses.replace(given, batch_size=100, bn_splits=8, adapt=True)
    assert (lambda c: (c.batch_size, c.bn_splits))(check_config(big, 12)) == (12, 2)


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("epochs", 0, "--epochs must be >= 1, got 0"),  # was a ZeroDivisionError
        ("batch_size", 0, "--batch-size must be >= 2, got 0"),  # a BatchNorm error
        ("image_size", 0, "--image-size must be from 8 to 2048 pixels, got 0"),  # the default
        ("image_size", 100_000, "--image-size must be from 8 to 2048 pixels, got 100000"),  # OOM
        ("lr", -1.0, "--lr must be > 0, got -1.0"),
        ("moco_t", 0.0, "--moco-t must be > 0, got 0.0"),  # a NaN loss at the first step
        ("moco_k", 0, "--moco-k must be >= 1, got 0"),  # a ZeroDivisionError
        ("moco_m", 1.5, "--moco-m must be in [0, 1], got 1.5"),  # trained on, diverging
        ("crop_min", 2.0, "--crop-min must be in (0, 1], got 2.0"),
        ("bn_splits", 0, "--bn-splits must be >= 1 (1: off), got 0"),
        ("workers", -1, "--workers must be >= 0 (0: in this process), got -1"),
        ("knn_k", 0, "--knn-k must be >= 1, got 0"),
        ("knn_t", 0.0, "--knn-t must be > 0, got 0.0"),
        # NaN compares false: ">= 0" let --minutes nan through, which trained for 200 epochs
        ("minutes", float("nan"), "--minutes must be a finite number, got nan"),
        ("minutes", float("inf"), "--minutes must be a finite number, got inf"),
        ("save_minutes", float("nan"), "--save-minutes must be a finite number, got nan"),
        ("warmup_epochs", float("nan"), "--warmup-epochs must be a finite number, got nan"),
        ("lr", float("inf"), "--lr must be a finite number, got inf"),
    ],
)
def test_numbers_no_run_can_use_are_refused_by_their_flag(
    field: str, value: object, said: str
) -> None:
    cfg = auto_config(TrainConfig(data="d", out="o", **{field: value}), 100, "cpu")
    with pytest.raises(ValueError, match=re.escape(said)):
        check_config(cfg, 100)
    check_config(auto_config(TrainConfig(data="d", out="o"), 100, "cpu"), 100)  # the defaults


def test_a_folder_of_one_image_is_refused_with_the_reason() -> None:
    cfg = auto_config(TrainConfig(data="one", out="o"), 1, "cpu")
    with pytest.raises(ValueError, match="one holds one image: MoCo tells images apart"):
        check_config(cfg, 1)


def test_small_images_train_at_the_official_cifar_temperature() -> None:
    """T = 0.1 for new v2 MoCo runs on small images; the papers' values elsewhere, and a resumed
    run that trained at 0.2 (saved as None) keeps it."""

    def temperature(device: str = "cpu", **kw: object) -> float:
        cfg = auto_config(TrainConfig(data="d", out="o", **kw), num_images=8809, device_type=device)
        return cfg.model_config().T

    assert temperature() == 0.1 and temperature(image_size=96) == 0.1
    assert temperature("cuda") == 0.2 and temperature(image_size=128) == 0.2
    assert temperature("cuda", image_size=32) == 0.1  # small images on a GPU: the CIFAR demo's
    assert temperature(version="v1") == 0.07
    assert temperature(mechanism="memory-bank") == 0.1  # ablate compares at one T
    assert temperature(moco_t=0.3) == 0.3 and temperature("cuda", moco_t=0.05) == 0.05
    assert temperature(resume=True) == 0.2  # an older run's None: the 0.2 it trained with
    assert temperature(resume=True, moco_t=0.1) == 0.1  # a newer run saved its value


def test_small_images_train_with_the_official_cifar_weight_decay() -> None:
    """5e-4 on images of at most 96 px, the paper's 1e-4 above; what the user sets is kept."""

    def decay(device: str = "cpu", **kw: object) -> float:
        cfg = auto_config(TrainConfig(data="d", out="o", **kw), num_images=8809, device_type=device)
        return cfg.weight_decay

    assert decay() == 5e-4 and decay(image_size=96) == 5e-4 and decay("cuda", image_size=32) == 5e-4
    assert decay("cuda") == 1e-4 and decay(image_size=128) == 1e-4
    assert decay(weight_decay=1e-4) == 1e-4 and decay("cuda", weight_decay=0.0) == 0.0


def test_encoders_embed_at_their_training_size_unless_told() -> None:
    def embed(**kw: object) -> int:
        cfg = auto_config(TrainConfig(data="d", out="o", **kw), num_images=8809, device_type="cpu")
        return cfg.embed_size

    assert embed() == 32 and embed(image_size=24) == 24
    assert embed(image_size=64) == 64 and embed(small_stem=True) == 32
    assert embed(embed_size=48) == 48
    gpu = auto_config(TrainConfig(data="d", out="o"), num_images=8809, device_type="cuda")
    assert gpu.embed_size == 224


def test_fit_momentum_averages_over_at_most_a_tenth_of_the_run() -> None:
    cfg = TrainConfig(data="d", out="o", moco_m=0.99)  # m_schedule "fit" by default
    assert Schedule(100, total_steps=100, warmup_steps=5).momentum(cfg, 0) == pytest.approx(0.9)
    assert Schedule(100, total_steps=400, warmup_steps=5).momentum(cfg, 9) == pytest.approx(0.975)
    assert Schedule(100, total_steps=50_000, warmup_steps=5).momentum(cfg, 0) == 0.99
    assert Schedule(100, total_steps=20, warmup_steps=5).momentum(cfg, 0) == 0.9  # at least 0.9
    rising = TrainConfig(data="d", out="o", moco_m=0.99, m_schedule="cosine")
    assert Schedule(100, 1000, 5).momentum(rising, 500) == pytest.approx(0.995)
    fixed = TrainConfig(data="d", out="o", moco_m=0.999, m_schedule="constant")
    assert Schedule(100, 100, 5).momentum(fixed, 50) == 0.999


def test_bf16_autocast_where_it_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    from moco import recipe

    def amp(device: str, **kw: object) -> bool | None:
        return auto_config(TrainConfig(data="d", out="o", **kw), 8809, device).amp

    monkeypatch.setattr(recipe, "cpu_has_bf16", lambda: True)  # a CPU with AMX
    assert amp("cpu") is False  # 32 px, the CPU default: fp32 measured faster there
    assert amp("cpu", image_size=48) is True and amp("cpu", image_size=224) is True
    assert amp("cpu", image_size=224, amp=False) is False  # --no-amp is kept
    monkeypatch.setattr(recipe, "cpu_has_bf16", lambda: False)  # bf16 would be emulated
    assert amp("cpu", image_size=224) is False
    assert amp("cuda") is True and amp("mps") is False


def test_cpu_bf16_probe_agrees_with_the_kernel() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    flag_lines = [x for x in lines if x.startswith("flags")]
    if not flag_lines:
        pytest.skip("no /proc/cpuinfo flags on this system")
    flags = set(flag_lines[0].split(":", 1)[1].split())
    from moco.recipe import cpu_has_bf16

    assert cpu_has_bf16() == bool(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})
