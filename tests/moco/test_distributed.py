"""A real 2-process DDP run (gloo on 127.0.0.1, the way ``torchrun`` starts it on CPU).

One ``torchrun --nproc-per-node 2`` launch runs ``_WORKER`` on both ranks. Each rank trains with
``moco.train.train`` on a tiny folder (a broken file included), saves its own MoCo state, then
checks the queue and the shuffled keys under the same process group. The tests read the files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import free_port

pytestmark = pytest.mark.slow

WORLD = 2

_WORKER = textwrap.dedent(
    '''
    """Run by torchrun on each rank: train, save this rank's weights, check enqueue and keys."""
    import json
    import os
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import moco.train as mt
    from moco.model import MoCo, ModelConfig

    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    made = []


    build = mt.build_model


    def capture(cfg):
        made.append(build(cfg))
        return made[-1]


    mt.build_model = capture  # the trainer builds its model through this name
    cfg = mt.TrainConfig(
        data=str(data), out=str(out / "run"), arch="resnet18", image_size=32, epochs=2,
        batch_size=8, moco_k=16, workers=0, seed=0, bn_splits=1, max_steps=2, cache="on",
    )
    mt.train(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.save(made[0].state_dict(), out / f"rank{rank}.pt")
    # The other mechanisms under DDP: one epoch each, every rank saves its state.
    for mech in ("memory-bank", "end-to-end"):
        run = mt.TrainConfig(**{**cfg.__dict__, "out": str(out / mech), "epochs": 1,
                                "mechanism": mech, "moco_k": 8})
        mt.train(run)
        torch.save(made[-1].state_dict(), out / f"{mech}{rank}.pt")
    # The memory-bank run again, interrupted on every rank after its first step, then resumed:
    # each rank must continue its own random stream (its bank negatives) where it stopped.
    real_loader = mt.loader


    def interrupted(*args, **kw):
        for i, batch in enumerate(real_loader(*args, **kw)):
            if i == 1:
                raise KeyboardInterrupt
            yield batch


    mt.loader = interrupted
    again = mt.TrainConfig(**{**cfg.__dict__, "out": str(out / "resumed"), "epochs": 1,
                              "mechanism": "memory-bank", "moco_k": 8})
    try:
        mt.train(again)
    except KeyboardInterrupt:
        dist.barrier()  # as a new launch would: resume once rank 0's checkpoint is written
    mt.loader = real_loader
    mt.train(mt.TrainConfig(**{**again.__dict__, "resume": True}))
    torch.save(made[-1].state_dict(), out / f"resumed{rank}.pt")

    # enqueue: every rank must write the keys of all ranks, in rank order, wrapping past K.
    torch.manual_seed(0)
    m = MoCo(ModelConfig(arch="resnet18", small_stem=True, dim=4, K=10, bn_splits=1))
    m.queue_ptr[0] = 7
    before = m.queue.clone()
    keys = torch.arange(3 * 4, dtype=torch.float32).view(3, 4) + 100 * (rank + 1)  # N x C
    m.enqueue(keys, torch.arange(3) + 10 * (rank + 1))
    result = {
        "queue": m.queue.tolist(), "before": before.tolist(), "ptr": int(m.queue_ptr),
        "queue_ids": m.queue_ids.tolist(),
    }

    # _keys: the cross-rank shuffle and un-shuffle must give each rank the keys of its own
    # images. In eval mode BatchNorm is per-sample, so they equal the local, unshuffled keys.
    torch.manual_seed(1)
    m.eval()
    im = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(10 + rank))
    with torch.no_grad():
        local = F.normalize(m.encoder_k(im), dim=1)
        shuffled = m._keys(im)
    result["keys_err"] = float((local - shuffled).abs().max())
    (out / f"check{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    '''
)


def _keys_enqueued(data: Path, epochs: int = 2, steps: int = 2, batch: int = 8) -> int:
    """Keys the worker's run enqueues: each step, the smallest rank batch times the ranks."""
    from moco.config import TrainConfig
    from moco.data import list_images
    from moco.trainset import shard

    paths = list_images(data)
    broken = [i for i, p in enumerate(paths) if p.name == "broken.png"]
    cfg = TrainConfig(data=str(data), out="", batch_size=batch, seed=0)
    per_rank, total = batch // WORLD, 0
    for epoch in range(epochs):
        shards = [shard(len(paths), epoch, cfg, r, WORLD, 0) for r in range(WORLD)]
        for step in range(steps):
            good = [
                len([i for i in sh[step * per_rank : (step + 1) * per_rank] if i not in broken])
                for sh in shards
            ]
            total += min(good) * WORLD
    return total


def _image_folder(root: Path, n: int = 16, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"c{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(sub / f"{i:02d}.png")
    (root / "c0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ddp")
    data = _image_folder(base / "images")
    out = base / "out"
    out.mkdir()
    script = base / "worker.py"
    script.write_text(_WORKER)
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU even on a GPU machine
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(WORLD),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        str(data),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (out / "stderr.txt").write_text(proc.stderr)
    return out


def test_ddp_runs_warn_of_nothing_the_user_cannot_act_on(ddp_run: Path) -> None:
    """torch 2.14 deprecates DDP's broadcast_buffers, which the memory bank needs (rank-local
    buffers); that is the code's business, not a warning on every rank of every run."""
    assert "broadcast_buffers" not in (ddp_run / "stderr.txt").read_text()


def test_ddp_ranks_end_with_identical_weights(ddp_run: Path) -> None:
    s0 = torch.load(ddp_run / "rank0.pt", weights_only=True)
    s1 = torch.load(ddp_run / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    params = [k for k in s0 if k.endswith((".weight", ".bias"))]
    assert len(params) > 100
    for k in [*params, "queue", "queue_ptr", "queue_ids"]:
        assert torch.equal(s0[k], s1[k]), k
    # Training really happened: the query encoder moved away from the momentum copy.
    assert not torch.equal(s0["encoder_q.conv1.weight"], s0["encoder_k.conv1.weight"])
    # 2 epochs x 2 steps x 8 keys (both ranks' keys) into a queue of 16, except in a step where
    # a rank's batch held the broken file: both ranks then stepped with 3 images, not 4. Where
    # the seeded shuffle puts it is asked of the trainer's own sharding, not assumed.
    assert int(s0["queue_ptr"]) == _keys_enqueued(ddp_run.parent / "images") % 16
    # The queue knows each key's image: dataset indexes from both ranks' shards, all distinct
    # within a step (the last step wrote the 8 keys before the pointer).
    ptr = int(s0["queue_ptr"])
    last = s0["queue_ids"][[(ptr - 1 - i) % 16 for i in range(8)]].tolist()
    assert min(last) >= 0 and len(set(last)) == 8


def test_ddp_memory_bank_and_end_to_end_stay_identical_across_ranks(ddp_run: Path) -> None:
    """Every rank applies every rank's bank updates; end-to-end's gradients are all-reduced."""
    for mech in ("memory-bank", "end-to-end"):
        s0 = torch.load(ddp_run / f"{mech}0.pt", weights_only=True)
        s1 = torch.load(ddp_run / f"{mech}1.pt", weights_only=True)
        assert s0.keys() == s1.keys() and "queue" not in s0
        # BatchNorm's running statistics are each rank's own, as in plain DDP
        for k in [k for k in s0 if k.endswith((".weight", ".bias")) or k == "bank"]:
            assert torch.equal(s0[k], s1[k]), (mech, k)
    from moco.data import list_images

    bank = torch.load(ddp_run / "memory-bank0.pt", weights_only=True)["bank"]
    n = len(list_images(ddp_run.parent / "images"))
    assert bank.shape[1] == n  # one entry per file listed (a broken file keeps its unused one)
    assert torch.allclose(bank.norm(dim=0), torch.ones(n), atol=1e-5)


def test_ddp_mid_epoch_resume_is_exact_on_every_rank(ddp_run: Path) -> None:
    """Rank 1 draws its own bank negatives: without its saved random state it would redraw the
    epoch's first step's after the resume, and its gradients (all-reduced) would differ."""
    assert (ddp_run / "resumed" / "checkpoint_last.rank1.rng.pt").is_file()
    for rank in range(WORLD):
        whole = torch.load(ddp_run / f"memory-bank{rank}.pt", weights_only=True)
        resumed = torch.load(ddp_run / f"resumed{rank}.pt", weights_only=True)
        # The checkpoint is rank 0's: rank 1 resumes with rank 0's BatchNorm running statistics
        # (rank-local, never used in training nor exported), so those are compared on rank 0.
        keys = [k for k in whole if rank == 0 or not k.endswith(("running_mean", "running_var"))]
        assert len(keys) > 80
        for k in keys:
            assert torch.equal(whole[k], resumed[k]), (rank, k)


def test_ddp_run_writes_logs_and_survives_broken_file(ddp_run: Path) -> None:
    run = ddp_run / "run"
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["steps"] == 2 and np.isfinite(r["loss"]) for r in rows)
    assert (run / "checkpoint_last.pt").is_file()
    # Rank 0 logs the broken files of every rank, wherever the shuffle puts it.
    assert [Path(x).name for x in (run / "skipped.txt").read_text().split()] == ["broken.png"]
    assert not (ddp_run / "run" / "checkpoint_last.pt.tmp").exists()


def test_ddp_queue_holds_keys_from_both_ranks(ddp_run: Path) -> None:
    for rank in range(WORLD):
        r = json.loads((ddp_run / f"check{rank}.json").read_text())
        queue, before = torch.tensor(r["queue"]), torch.tensor(r["before"])  # C x K
        written = [7, 8, 9, 0, 1, 2]  # ptr 7, 2 ranks x 3 keys, K=10: wraps
        expect = torch.cat(
            [torch.arange(12.0).view(3, 4) + 100 * (src + 1) for src in range(WORLD)]
        ).T  # C x (world*N), rank 0's keys first
        assert torch.equal(queue[:, written], expect), rank
        untouched = [3, 4, 5, 6]
        assert torch.equal(queue[:, untouched], before[:, untouched])
        assert r["ptr"] == 3
        assert [r["queue_ids"][i] for i in written] == [10, 11, 12, 20, 21, 22]
        assert all(r["queue_ids"][i] == -1 for i in untouched)


def test_ddp_shuffled_keys_return_to_their_images(ddp_run: Path) -> None:
    for rank in range(WORLD):
        r = json.loads((ddp_run / f"check{rank}.json").read_text())
        assert r["keys_err"] < 1e-5, rank


def test_a_device_that_is_not_one_or_not_here_is_refused_by_its_flag() -> None:
    from moco.distributed import default_device

    assert default_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device 'nope' is not a torch device \(cpu, cuda"):
        default_device("nope")  # torch: "Expected one of cpu, cuda, ipu, xpu, ..."
    if not torch.cuda.is_available():  # torch: "Found no NVIDIA driver on your system"
        with pytest.raises(ValueError, match="--device cuda:1: this machine has no usable CUDA"):
            default_device("cuda:1")
