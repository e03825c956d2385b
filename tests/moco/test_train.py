"""Pretraining end to end on tiny real images: loss falls, resume is exact, bad input is handled."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import launch
from moco.augment import moco_transform
from moco.checkpoint import LAST
from moco.data import list_images, load_image
from moco.export import CheckpointError, load_checkpoint_file
from moco.model import MoCo, ModelConfig
from moco.recipe import LR_PER_256, WARMUP_FRACTION
from moco.train import LOCK_NAME, TrainConfig, check_config, train
from tests.conftest import hold, interruptible
from tests.moco.conftest import DEMO

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        image_size=32,
        batch_size=8,
        moco_k=16,
        epochs=2,
        workers=0,
        cache="on",
        bn_splits=2,
        lr=0.03,
        deterministic=True,
    )
    return TrainConfig(**{**base, **kw})


def tiny_pretrain_args(data: Path, run: Path, epochs: int) -> list[str]:
    """``pretrain`` on the command line with the tiny settings (32 px, batch 4, K 16)."""
    return [
        "pretrain",
        str(data),
        "--out",
        str(run),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--moco-k",
        "16",
        "--workers",
        "0",
        "--epochs",
        str(epochs),
    ]


def read_log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def test_loss_falls_on_real_images(emoji_dir: Path) -> None:
    """Fixed views of 16 real images against a queue of keys of 16 others: the full MoCo step
    (momentum, shuffled BN, InfoNCE, SGD) must learn to pick out each positive."""
    torch.manual_seed(0)
    images = [load_image(p) for p in list_images(emoji_dir)]
    view = moco_transform(32, "v2")
    q_view, k_view = (torch.stack([view(im) for im in images[:16]]) for _ in range(2))
    negatives = torch.stack([view(im) for im in images[16:]])
    model = MoCo(ModelConfig(arch="resnet18", small_stem=False, K=16, m=0.99, T=0.2))
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        with torch.no_grad():  # the whole queue: keys of the other images (no false negatives)
            model.enqueue(F.normalize(model.encoder_k(negatives), dim=1))
        loss, _, _ = model(q_view, k_view)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses


def held_out(emoji_dir: Path, out: Path, per_class: int = 2) -> Path:
    """A --val-dir of other images of the same classes (the demo set's next ones)."""
    for label in sorted(d.name for d in emoji_dir.iterdir()):
        (out / label).mkdir(parents=True)
        for src in sorted((DEMO / label).glob("*.webp"))[8 : 8 + per_class]:
            shutil.copy(src, out / label / src.name)
    return out


def test_training_run_writes_its_outputs(emoji_dir: Path, tmp_path: Path) -> None:
    val = held_out(emoji_dir, tmp_path / "val")
    ckpt = train(tiny_cfg(emoji_dir, tmp_path / "run", epochs=2, val_dir=str(val)))
    rows = read_log(tmp_path / "run")
    assert all(0 <= r["knn_top1"] <= 100 for r in rows)  # the kNN monitor ran each epoch
    assert [r["epoch"] for r in rows] == [1, 2] and ckpt.is_file()
    assert all(r["steps"] == 4 and r["loss"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert rows[1]["lr"] < rows[0]["lr"]  # cosine decay
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "config.json").is_file()
    assert any((tmp_path / "run" / "tb").iterdir())
    assert not list((tmp_path / "run").glob("checkpoint_0*.pt"))  # only the last by default


def test_save_minutes_keeps_a_checkpoint_per_period(emoji_dir: Path, tmp_path: Path) -> None:
    """--save-minutes M: a numbered checkpoint at the first epoch end after each M minutes; a
    period shorter than an epoch gives one per epoch, never more."""
    train(tiny_cfg(emoji_dir, tmp_path / "run", epochs=3, save_minutes=1e-6))
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint_0*.pt"))
    assert names == ["checkpoint_0001.pt", "checkpoint_0002.pt", "checkpoint_0003.pt"]
    assert load_checkpoint_file(tmp_path / "run" / names[1])["epoch"] == 2


def test_bf16_autocast_trains_on_cpu(emoji_dir: Path, tmp_path: Path) -> None:
    """``--amp`` on a CPU (the default on CPUs with bf16 units from 48 px): split-BN, queue and
    loss under bf16 autocast; the weights and the queue stay fp32, the choice is saved."""
    ckpt = train(tiny_cfg(emoji_dir, tmp_path / "run", amp=True, deterministic=False))
    rows = read_log(tmp_path / "run")
    assert all(0 < r["loss"] < 20 for r in rows)
    state = load_checkpoint_file(ckpt)
    assert state["config"]["amp"] is True
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(
    emoji_dir: Path, tmp_path: Path
) -> None:
    full = tmp_path / "full"
    train(tiny_cfg(emoji_dir, full, save_every=1))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "checkpoint_0001.pt", part / LAST)  # the state after epoch 1 of 2
    train(tiny_cfg(emoji_dir, part, resume=True))
    a = load_checkpoint_file(full / LAST)["model"]
    b = load_checkpoint_file(part / LAST)["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert load_checkpoint_file(part / LAST)["epoch"] == 2


def test_a_val_dir_without_class_folders_is_refused_before_the_run_folder_is_made(
    emoji_dir: Path, tmp_path: Path
) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(emoji_dir.rglob("*.png"))[:4]:
        shutil.copy(f, flat / f.name)
    with pytest.raises(ValueError, match="must be an ImageFolder tree"):
        train(tiny_cfg(emoji_dir, tmp_path / "run", val_dir=str(flat)))
    assert not (tmp_path / "run").exists()  # the corrected command starts afresh


def test_a_val_dir_of_training_images_is_refused_and_shared_ones_are_counted(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kNN monitor finds a training image itself: a --val-dir that is the training folder
    scores near 100% from the first epoch and means nothing."""
    with pytest.raises(ValueError, match=r"every image of --val-dir .* is also a training image"):
        train(tiny_cfg(emoji_dir, tmp_path / "run", val_dir=str(emoji_dir)))
    assert not (tmp_path / "run").exists()
    val = held_out(emoji_dir, tmp_path / "val", per_class=1)
    seen = sorted((emoji_dir / "symbols").iterdir())[0]
    (val / "symbols" / seen.name).symlink_to(seen)
    with caplog.at_level("WARNING"):
        train(tiny_cfg(emoji_dir, tmp_path / "run", epochs=1, max_steps=1, val_dir=str(val)))
    assert "1 of the 5 --val-dir images are training images too" in caplog.text


def test_a_damaged_last_checkpoint_says_how_to_go_on(emoji_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = train(tiny_cfg(emoji_dir, run, epochs=2, max_steps=1, save_every=1))
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # damaged outside the run (a copy cut short)
    resume = tiny_cfg(emoji_dir, run, epochs=3, max_steps=1, resume=True)
    with pytest.raises(CheckpointError, match=r"Copy the last numbered checkpoint over it "):
        train(resume)
    shutil.copy(run / "checkpoint_0002.pt", ckpt)  # as it says
    assert load_checkpoint_file(train(resume))["epoch"] == 3
    for numbered in run.glob("checkpoint_0*.pt"):
        numbered.unlink()
    ckpt.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"another --out, or delete {re.escape(str(ckpt))}"):
        train(resume)


def test_resuming_a_finished_run_says_there_is_nothing_to_train(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    ckpt = train(tiny_cfg(emoji_dir, run, epochs=1, max_steps=1))
    before = ckpt.read_bytes()
    caplog.set_level("INFO")
    train(tiny_cfg(emoji_dir, run, epochs=1, max_steps=1, resume=True))
    assert "nothing to train: the run has done 1 of its 1 epochs" in caplog.text
    assert ckpt.read_bytes() == before


def test_skipped_files_named_in_no_encoding_are_listed_as_the_disk_names_them(
    tmp_path: Path,
) -> None:
    """A broken file whose name is not UTF-8 failed the run when skipped.txt was written
    ("surrogates not allowed"); listed, it is read back as the same path on resume."""
    from moco.trainlog import RunLog

    paths = [tmp_path / os.fsdecode(b"caf\xe9.png"), tmp_path / "ok.png"]
    RunLog(tmp_path / "run", tiny_cfg(tmp_path, tmp_path / "run"), paths).skipped([0])
    assert (tmp_path / "run" / "skipped.txt").read_bytes() == os.fsencode(paths[0]) + b"\n"
    assert RunLog(tmp_path / "run", tiny_cfg(tmp_path, tmp_path / "run"), paths).bad == {0}


def test_broken_file_is_skipped_and_logged(emoji_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(emoji_dir, data)
    (data / "symbols" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (data / "symbols" / "empty.jpg").write_bytes(b"")
    train(tiny_cfg(data, tmp_path / "run", epochs=1, cache="off"))
    skipped = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert sorted(Path(s).name for s in skipped) == ["broken.png", "empty.jpg"]
    assert read_log(tmp_path / "run")[0]["skipped_files"] == 2
    # A resumed run meets the same files again: listed once, still counted in its rows.
    train(tiny_cfg(data, tmp_path / "run", epochs=2, cache="off", resume=True))
    assert sorted((tmp_path / "run" / "skipped.txt").read_text().splitlines()) == sorted(skipped)
    assert [r["skipped_files"] for r in read_log(tmp_path / "run")] == [2, 2]


@pytest.mark.parametrize("augment", ["batch", "pil"])
def test_a_folder_of_broken_files_is_refused_before_the_run_starts(
    tmp_path: Path, augment: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"x")
    (data / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 64)
    (data / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ValueError, match=r"0 of the 3 training files .* could be read"):
        train(tiny_cfg(data, tmp_path / "run", augment=augment, batch_size=2, bn_splits=1))
    assert not (tmp_path / "run").exists()  # nothing to resume, nothing to clean up


def test_short_epochs_report_at_first_last_and_numbered(
    emoji_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Monitors and checkpoint_last.pt are throttled; every epoch is still in the log."""
    monkeypatch.setattr("moco.train.REPORT_SECONDS", 1e9)  # only the forced reports
    run = tmp_path / "run"
    ckpt = train(tiny_cfg(emoji_dir, run, epochs=5, max_steps=1, save_every=3))
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert ["view_recall" in r for r in rows] == [True, False, True, False, True]
    assert sorted(p.name for p in run.glob("checkpoint_0*.pt")) == ["checkpoint_0003.pt"]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 5
    monkeypatch.setattr("moco.train.REPORT_SECONDS", 0.0)  # a report at every epoch
    train(tiny_cfg(emoji_dir, tmp_path / "every", epochs=3, max_steps=1))
    assert all("view_recall" in r for r in read_log(tmp_path / "every"))


def test_small_data_checks(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_cfg(emoji_dir, tmp_path, moco_k=4096, lr=1.0, moco_m=0.999, m_schedule="constant")
    assert check_config(cfg, 32) == cfg  # only warns
    assert "queue size K=4096" in caplog.text and "linear scaling" in caplog.text
    assert "momentum m=0.999" in caplog.text  # 2 epochs x 4 steps cannot move the key encoder
    caplog.clear()
    with caplog.at_level("INFO", logger="moco.recipe"):
        adapted = check_config(replace(cfg, adapt=True), 32)
    assert adapted.moco_k == 8 and adapted.lr == pytest.approx(LR_PER_256 * 8 / 256)
    assert adapted.moco_m == 0.9
    # --adapt reports its changes in one INFO line, old -> new, and warns no more
    assert [r.getMessage() for r in caplog.records] == [
        f"adapted to 32 images: K 4096 -> 8, m 0.999 -> 0.9, lr 1 -> {adapted.lr:.4g}"
    ]
    caplog.clear()
    check_config(replace(cfg, moco_m=0.9, moco_k=8, lr=None), 32)  # already the floor: no advice
    assert "momentum" not in caplog.text
    long_run = replace(cfg, adapt=True, epochs=10_000, moco_k=16)
    assert check_config(long_run, 32).moco_m == 0.999  # 40k steps: the paper's m is fine
    with pytest.raises(ValueError, match="batch size 64 exceeds the 32 images"):
        check_config(replace(cfg, batch_size=64), 32)
    assert check_config(replace(cfg, batch_size=64, adapt=True), 32).batch_size == 32
    with pytest.raises(ValueError, match="No images found"):
        check_config(cfg, 0)
    # a negative budget or period would silently train or save nothing
    with pytest.raises(ValueError, match="--save-minutes must be >= 0"):
        check_config(replace(cfg, save_minutes=-1), 32)
    with pytest.raises(ValueError, match="--minutes must be >= 0"):
        check_config(replace(cfg, minutes=-0.5), 32)
    with pytest.raises(ValueError, match="--warmup-epochs must be >= 0"):
        check_config(replace(cfg, warmup_epochs=-1.0), 32)
    assert check_config(replace(cfg, warmup_epochs=0.0), 32).warmup_epochs == 0.0


def test_cli_errors_are_one_line(
    emoji_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = launch.main(["pretrain", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert rc == 2 and "Image folder not found" in capsys.readouterr().err
    rc = launch.main(["pretrain", str(emoji_dir), "--out", str(tmp_path / "r"), "--arch", "vgg"])
    assert rc == 2 and "Unknown arch 'vgg'" in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_clear_message(
    emoji_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "pretrain",
        str(emoji_dir),
        "--out",
        str(tmp_path / "r"),
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--moco-k",
        "16",
        "--workers",
        "0",
        "--moco-t",
        "1e-45",
        "--epochs",
        "1",
    ]
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "lower --lr" in err


def test_existing_run_is_not_overwritten(emoji_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LAST).write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_cfg(emoji_dir, run))


def test_a_run_in_training_is_not_trained_twice(
    emoji_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The same command again in another terminal, or a ``--resume`` while the run still trains:
    both wrote the same checkpoints and log; the second is refused at once, and the run's folder
    is left as it was."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("")
    holder = hold(run / LOCK_NAME)
    try:
        for extra in ([], ["--resume"]):
            assert launch.main([*tiny_pretrain_args(emoji_dir, run, 1), *extra]) == 2
            assert capsys.readouterr().err.strip() == (
                f"moco-search pretrain: error: Run {run} is in use by another pretraining "
                f"process (pid {holder.pid}): let it finish (Ctrl-C there saves it, and --resume "
                "carries it on), or choose another --out"
            )
        assert sorted(p.name for p in run.iterdir()) == ["log.jsonl", LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    train(tiny_cfg(emoji_dir, run, epochs=1))  # its holder gone, the folder is free again
    assert (run / LAST).is_file() and len(read_log(run)) == 1


def test_epochs_beside_minutes_are_said_to_be_ignored(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = [*tiny_pretrain_args(emoji_dir, tmp_path / "r", 1), "--minutes", "0.01"]
    with caplog.at_level("WARNING"):
        assert launch.main(args) == 0
    assert "--minutes 0.01 plans the run's epochs itself: --epochs 1 is ignored" in caplog.text


def test_only_rank_0_reports_the_end_of_a_run(
    emoji_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``torchrun`` every rank runs the command: the summary and the next step once."""
    run = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it on the second process
    assert launch.main(tiny_pretrain_args(emoji_dir, run, 1)) == 0
    assert "next: moco-search export" not in capsys.readouterr().out
    monkeypatch.delenv("RANK")
    assert launch.main([*tiny_pretrain_args(emoji_dir, run, 2), "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"next: moco-search export {run / LAST} --out {run / 'encoder'}") == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_keeps_the_last_checkpoint_and_resume_carries_on(
    emoji_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The kernel's ENOSPC (/dev/full behind the checkpoint's temporary file) at epoch 2: one
    line, the epoch-1 checkpoint and log kept as they were, and ``--resume`` then finishes."""
    run = tmp_path / "run"
    assert launch.main(tiny_pretrain_args(emoji_dir, run, 1)) == 0
    kept = (run / LAST).read_bytes()
    (run / f"{LAST}.tmp").symlink_to("/dev/full")
    assert launch.main([*tiny_pretrain_args(emoji_dir, run, 2), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"moco-search pretrain: error: Disk full while writing run {run}: nothing was lost (its "
        "last checkpoint is kept, no temporary file is left); free some space and re-run with "
        "--resume to carry on"
    )
    assert (run / LAST).read_bytes() == kept
    assert not (run / f"{LAST}.tmp").is_symlink()
    assert [r["epoch"] for r in read_log(run)] == [1]  # the log is not ahead of the checkpoint
    assert launch.main([*tiny_pretrain_args(emoji_dir, run, 2), "--resume"]) == 0
    assert [r["epoch"] for r in read_log(run)] == [1, 2]
    assert load_checkpoint_file(run / LAST)["epoch"] == 2
    # The disk fills while the log is written (the checkpoint fitted): the log keeps its rows
    # whole (half a row appended would break every reader), and the run can go on.
    log_before = (run / "log.jsonl").read_bytes()
    (run / "log.jsonl.tmp").symlink_to("/dev/full")
    assert launch.main([*tiny_pretrain_args(emoji_dir, run, 3), "--resume"]) == 2
    assert "Disk full while writing run" in capsys.readouterr().err.splitlines()[-1]
    assert (run / "log.jsonl").read_bytes() == log_before
    assert not (run / "log.jsonl.tmp").is_symlink()
    assert load_checkpoint_file(run / LAST)["epoch"] == 3  # ahead of the log, never behind
    # The checkpoint carries the row the log lacks: the resume writes it back.
    assert launch.main([*tiny_pretrain_args(emoji_dir, run, 4), "--resume"]) == 0
    assert [r["epoch"] for r in read_log(run)] == [1, 2, 3, 4]


def test_ctrl_c_just_after_an_epochs_checkpoint_keeps_its_log_row(
    emoji_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal lands between epoch 1's checkpoint and its ``log.jsonl`` row (CI hit this
    window once): the row is written on the way out, and the resume logs epoch 2 after it."""
    import moco.train

    save, fired = moco.train.save_checkpoint, []

    def save_then_interrupt(path: Path, payload: dict) -> Path:
        done = save(path, payload)
        if not fired and payload["epoch"] == 1 and payload["step"] == 0:
            fired.append(path)
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(moco.train, "save_checkpoint", save_then_interrupt)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(emoji_dir, run, epochs=2))
    assert fired and load_checkpoint_file(run / LAST)["epoch"] == 1
    assert [r["epoch"] for r in read_log(run)] == [1]
    train(tiny_cfg(emoji_dir, run, epochs=2, resume=True))
    assert [r["epoch"] for r in read_log(run)] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_and_resume_finishes(emoji_dir: Path, tmp_path: Path, sig: int) -> None:
    """Ctrl-C, and SIGTERM (timeout, docker stop, systemd), save the run where it is."""
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "launch.py"), *tiny_pretrain_args(emoji_dir, run, 50)]
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=interruptible,
    )
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    ckpt = load_checkpoint_file(run / LAST)
    assert ckpt["epoch"] >= 1
    # Resume with fewer epochs than planned finishes at once without error.
    done = train(
        tiny_cfg(
            emoji_dir,
            run,
            batch_size=4,
            epochs=int(ckpt["epoch"]) + 1,
            resume=True,
            bn_splits=8,
            lr=None,
        )
    )
    assert load_checkpoint_file(done)["epoch"] == int(ckpt["epoch"]) + 1
    # The run's clock goes on across the interruption: elapsed_s never restarts.
    elapsed = [r["elapsed_s"] for r in read_log(run)]
    assert len(elapsed) >= 2 and elapsed == sorted(elapsed) and elapsed[0] > 0


def test_a_minutes_run_interrupted_before_its_plan_starts_again_on_resume(
    emoji_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C before --minutes has timed its first steps: the saved schedule is a placeholder
    (here 10,000 epochs, which a resume would run with no clock), so the resume starts the run
    again on its budget."""
    import moco.train

    save, fired = moco.train.save_checkpoint, []

    def save_then_interrupt(path: Path, payload: dict) -> Path:
        done = save(path, payload)
        if not fired:
            fired.append(path)
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(moco.train, "save_checkpoint", save_then_interrupt)
    data = tmp_path / "data"
    shutil.copytree(emoji_dir, data)
    (data / "symbols" / "broken.png").write_bytes(b"")
    run = tmp_path / "run"
    # 60 minutes: a tenth of the budget gone also plans, which 4 slow steps reached on a loaded
    # machine at 5 (30 s); the resume below gives the real budget
    cfg = tiny_cfg(data, run, minutes=60, epochs=10_000, deterministic=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)  # epoch 1 is 4 steps: saved before the 10 that time the pace
    first_curves = set((run / "tb").iterdir())
    assert load_checkpoint_file(run / LAST)["config"]["total_steps"] == 0
    caplog.set_level("INFO")
    t0 = time.perf_counter()
    ckpt = train(dataclasses.replace(cfg, minutes=0.2, resume=True), given={"minutes"})
    assert time.perf_counter() - t0 < 90  # on its budget, not 10,000 epochs
    assert "before --minutes 0.2 had timed the first steps" in caplog.text
    assert "starting the run again" in caplog.text and "chose" in caplog.text
    assert load_checkpoint_file(ckpt)["config"]["total_steps"] > 0
    epochs = [r["epoch"] for r in read_log(run)]
    assert epochs[0] == 1 and epochs == sorted(set(epochs))  # the restarted run's rows only
    assert [Path(p).name for p in (run / "skipped.txt").read_text().split()] == ["broken.png"]
    assert first_curves and not first_curves & set((run / "tb").iterdir())


def test_ctrl_c_after_minutes_planned_inside_an_epoch_saves_the_plan(
    emoji_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--minutes plans after 10 steps, inside epoch 3 here: a Ctrl-C there saves that plan, not
    the placeholder the epoch began with, so a resume continues the planned schedule."""
    import moco.loop

    planned = moco.loop.plan

    def plan_then_interrupt(state: object, done: int) -> None:
        planned(state, done)
        raise KeyboardInterrupt

    monkeypatch.setattr(moco.loop, "plan", plan_then_interrupt)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(emoji_dir, run, minutes=5, epochs=10_000, deterministic=False))
    ckpt = load_checkpoint_file(run / LAST)
    assert ckpt["step"] > 0  # inside an epoch
    saved = ckpt["config"]["total_steps"]
    assert 0 < saved < 10_000 * 4
    assert saved == json.loads((run / "config.json").read_text())["total_steps"]


def test_minutes_stops_on_its_own_and_logs_the_epochs_it_chose(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    caplog.set_level("INFO")
    run = tmp_path / "run"
    t0 = time.perf_counter()
    ckpt = train(tiny_cfg(emoji_dir, run, minutes=0.5, epochs=10_000, deterministic=False))
    assert time.perf_counter() - t0 < 120  # stopped by itself, long before 10,000 epochs
    assert ckpt.is_file() and load_checkpoint_file(ckpt)["epoch"] >= 1
    assert "--minutes 0.5:" in caplog.text and "chose" in caplog.text
    chosen = json.loads((run / "config.json").read_text())
    assert chosen["total_steps"] > 0 and chosen["epochs"] < 10_000
    rows = read_log(run)
    assert rows[-1]["planned_epochs"] == pytest.approx(chosen["total_steps"] / 4)
    assert "stopped after" in caplog.text
    warmup = re.search(r"\(warm-up (\d+), then cosine", caplog.text)
    assert warmup and int(warmup.group(1)) > 0  # unset: a share of the run
    # the progress bar counts the planned epochs from the plan on, within the epoch it was
    # made in (it said "/10000" until the next epoch's bar)
    bars = re.findall(r"epoch (\d+)/(\d+):", capsys.readouterr().err)
    planned = next(i for i, (_, total) in enumerate(bars) if total != "10000")
    assert planned > 0 and bars[planned][0] == bars[planned - 1][0]
    assert bars[-1][1] == str(chosen["epochs"])


def test_minutes_keeps_a_warmup_of_zero_when_given(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--warmup-epochs 0`` means none, with ``--minutes`` too (it once read as unset)."""
    caplog.set_level("INFO")
    run = tmp_path / "run"
    cfg = tiny_cfg(emoji_dir, run, minutes=0.4, epochs=10_000, warmup_epochs=0.0)
    train(replace(cfg, deterministic=False))
    assert "(warm-up 0, then cosine" in caplog.text
    # long enough that the default's 5% would be a warm-up of at least one step (11 steps and
    # more: on a loaded machine 0.2 minutes gave 7 to 12 steps, 0.4 gives twice that)
    total = json.loads((run / "config.json").read_text())["total_steps"]
    assert round(WARMUP_FRACTION * total) >= 1
    assert read_log(run)[0]["lr"] > 0.5 * 0.03  # near the base lr from the first steps


def test_untrained_baseline_is_logged_and_is_a_real_measurement(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    cfg = tiny_cfg(emoji_dir, tmp_path / "run", epochs=1)
    train(cfg)
    row = read_log(tmp_path / "run")[0]
    assert "untrained network: finds augmented copies" in caplog.text
    assert "untrained" in caplog.text.splitlines()[-1]  # the verdict line
    # The logged figure is the monitor applied to the network the run started from...
    from moco.recipe import auto_config
    from moco.train import _seed_all
    from moco.trainset import holdout, view_monitor

    _, paths, _ = holdout(list_images(emoji_dir), cfg)
    cfg = auto_config(cfg, 32, "cpu")
    views = view_monitor(cfg, paths)
    assert views is not None
    _seed_all(cfg.seed)
    start = MoCo(cfg.model_config())
    assert views(start.encoder_q) == pytest.approx(row["untrained_view_recall"])
    # ...and a measurement of the weights: a network that maps everything alike scores 1/n.
    with torch.no_grad():
        for p in start.encoder_q.parameters():
            p.zero_()
    assert views(start.encoder_q) == pytest.approx(100 / len(views))
    assert row["untrained_view_recall"] > 100 / len(views)


def test_a_run_in_its_own_image_folder_is_refused_before_writing(
    emoji_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out`` the image folder itself: a run below it is passed over, the folder itself is
    not, so its curves.png was a training image on resume."""
    import launch

    data = tmp_path / "data"
    shutil.copytree(emoji_dir, data)
    before = sorted(p.name for p in data.iterdir())
    assert launch.main(["pretrain", str(data), "--out", str(data) + "/", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "is the image folder itself: give the run a folder of its own, such as --out " in err
    assert sorted(p.name for p in data.iterdir()) == before


def resume_args(data: Path, run: Path) -> list[str]:
    return ["pretrain", str(data), "--out", str(run), "--resume"]


def test_resume_needs_only_data_and_out(
    emoji_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The run's saved settings are used; a flag given beside --resume overrides and is said;
    one that cannot change mid-run is refused in one line."""
    import launch

    run = tmp_path / "run"
    first = [
        *tiny_pretrain_args(emoji_dir, run, 1),
        "--max-steps",
        "2",
        "--monitor-images",
        "0",
        "--bn-splits",
        "2",
    ]
    assert launch.main(first) == 0
    with caplog.at_level("INFO", logger="moco.train"):
        assert (
            launch.main(
                ["pretrain", str(emoji_dir), "--out", str(run), "--resume", "--epochs", "2"]
            )
            == 0
        )
    ckpt = load_checkpoint_file(run / LAST)
    assert ckpt["epoch"] == 2
    saved = ckpt["config"]
    assert (saved["image_size"], saved["moco_k"], saved["batch_size"]) == (32, 16, 4)
    assert "resume: --epochs 2 (the run had 1)" in caplog.text
    capsys.readouterr()
    rc = launch.main(["pretrain", str(emoji_dir), "--out", str(run), "--resume", "--moco-k", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and "--moco-k cannot change when resuming" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    trained = (run / LAST).read_bytes()  # --minutes on an --epochs run: it was started again,
    rc = launch.main([*resume_args(emoji_dir, run), "--minutes", "0.2"])  # its weights lost
    err = capsys.readouterr().err
    assert rc == 2 and f"--minutes cannot be given to resume the run in {run}" in err
    assert len(err.strip().splitlines()) == 1 and (run / LAST).read_bytes() == trained
    # A flag set back to its default value overrides too (the run had --bn-splits 2).
    resume = ["pretrain", str(emoji_dir), "--out", str(run), "--resume", "--epochs", "3"]
    with caplog.at_level("INFO", logger="moco.train"):
        assert launch.main([*resume, "--bn-splits", "8", "--save-every", "0"]) == 0
    assert load_checkpoint_file(run / LAST)["config"]["bn_splits"] == 8
    assert "resume: --bn-splits 8 (the run had 2)" in caplog.text
    moved = shutil.copytree(emoji_dir, tmp_path / "moved")  # another DATA is said too
    with caplog.at_level("INFO", logger="moco.train"):
        assert launch.main(["pretrain", str(moved), "--out", str(run), "--resume"]) == 0
    assert f"resume: training on {moved} (the run had {emoji_dir})" in caplog.text


def test_epoch_numbers_count_from_one_for_old_and_new_logs() -> None:
    """New logs are 1-based; a log written when they counted from 0 (the shipped demo
    encoder's) is read as 1-based too."""
    from moco.trainlog import epoch_numbers

    assert epoch_numbers([{"epoch": 1}, {"epoch": 2}]) == [1, 2]
    assert epoch_numbers([{"epoch": 0}, {"epoch": 1}]) == [1, 2]
    assert epoch_numbers([]) == []
