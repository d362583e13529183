"""The classifier's training step (``ray_jobs/classifier/step.py``) without Ray.

* DDP on 2 gloo processes: each rank takes one ``ClassifierStep`` step on its half of a batch;
  both end with identical weights, equal (within float tolerance) to one single-process step on
  the whole batch. The models' BatchNorms run in eval mode for that comparison (running
  statistics, so each image's gradient does not depend on the rest of its batch: the mean of the
  two half-batch gradients, which DDP all-reduces, is then the whole batch's gradient); a second
  step in train mode checks the ranks still agree.
* A non-finite loss stops the step before any update, with the message naming epoch, step and
  rank, which the driver turns into the project's ``TrainingError``.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

from medbalance.errors import TrainingError
from ray_jobs.classifier.config import DataSection, OptimSection, TrainConfig
from ray_jobs.classifier.pipeline import InputSpec
from ray_jobs.classifier.step import build_step
from ray_jobs.runtime import collectives
from ray_jobs.runtime.training_run import raise_for_status

CLASS_COUNTS = [6, 5, 5]          # 16 rows: 2 steps per epoch of 8 (one process) or 4 (per rank)
BATCH, SIZE = 8, 32


def make_cfg(batch_size: int) -> TrainConfig:
    """resnet18, CE, SGD with momentum, the clip-norm active at 0.5, channels_last."""
    return TrainConfig(model="resnet18", loss="ce", epochs=2, num_workers=1, channels_last=True,
                       optim=OptimSection(lr=0.05, clip_grad_norm=0.5), data=DataSection(batch_size=batch_size))


def whole_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 BATCH x 3 x SIZE x SIZE images and BATCH labels, the same in every process."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    return images, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)                                            # the same initial weights
    step = build_step(make_cfg(BATCH // world), 3, CLASS_COUNTS, InputSpec(), torch.device("cpu"),
                      rank=rank, world=world, wrap=lambda m: DDP(m))
    images, labels = whole_batch()
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # this rank's rows
    step.model.eval()                                               # BatchNorm: running statistics
    loss = step.step(images[half], labels[half], epoch=0, step_index=0)
    after_one = params(step.model)
    step.start_epoch(0)                                             # train mode: batch statistics
    step.step(images[half].flip(3), labels[half], epoch=0, step_index=1)
    torch.save({"after_one": after_one, "after_two": params(step.model), "loss": loss},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_gloo_ranks_match_each_other_and_one_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for stage in ("after_one", "after_two"):
        assert all(torch.equal(a, b) for a, b in zip(r0[stage], r1[stage])), stage

    torch.manual_seed(0)
    single = build_step(make_cfg(BATCH), 3, CLASS_COUNTS, InputSpec(), torch.device("cpu"))
    initial = params(single.model)
    images, labels = whole_batch()
    single.model.eval()
    loss = single.step(images, labels, epoch=0, step_index=0)
    assert torch.allclose((r0["loss"] + r1["loss"]) / 2, loss, rtol=1e-5, atol=1e-6)
    for name_param, one, ddp in zip(single.model.named_parameters(), params(single.model), r0["after_one"]):
        assert torch.allclose(one, ddp, rtol=1e-4, atol=1e-6), name_param[0]
    moved = sum(float((a - b).abs().sum()) for a, b in zip(initial, r0["after_one"]))
    assert moved > 0                                                # the step did update the weights


def test_nan_loss_stops_before_any_update_naming_epoch_and_step():
    torch.manual_seed(0)
    step = build_step(make_cfg(4), 3, CLASS_COUNTS, InputSpec(), torch.device("cpu"))
    images, labels = whole_batch()
    before = params(step.model)
    step.start_epoch(2)
    with pytest.raises(collectives.Stop) as stopped:
        step.step(images[:4], labels[:4], epoch=2, step_index=5, inject_nan=True)
    assert stopped.value.status == "non_finite"
    assert "non-finite loss (nan) at epoch 2 step 5 on rank 0" in stopped.value.message
    assert all(torch.equal(a, b) for a, b in zip(before, params(step.model)))  # nothing was updated
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 2 step 5 .* Last good checkpoint: ck"):
        raise_for_status(stopped.value.status, stopped.value.message, "ck")

    # A NaN reaching the model (float rows, as no pipeline gives them): the same stop, no hook.
    nan_images = images[:4].float().index_fill_(0, torch.tensor([1]), float("nan"))
    with pytest.raises(collectives.Stop, match=r"non-finite loss \(nan\) at epoch 3 step 0 on rank 0"):
        step.step(nan_images, labels[:4], epoch=3, step_index=0)
    assert all(torch.equal(a, b) for a, b in zip(before, params(step.model)))


def test_bf16_autocast_step_and_state_round_trip():
    """amp=bf16 on CPU trains (no scaler); the checkpoint core restores a step exactly."""
    cfg = make_cfg(4)
    cfg.amp = "bf16"
    torch.manual_seed(0)
    step = build_step(cfg, 3, CLASS_COUNTS, InputSpec(), torch.device("cpu"))
    assert step.autocast_dtype == torch.bfloat16 and not step.scaler.is_enabled()
    images, labels = whole_batch()
    step.start_epoch(0)
    assert torch.isfinite(step.step(images[:4], labels[:4], epoch=0, step_index=0))
    restored = build_step(cfg, 3, CLASS_COUNTS, InputSpec(), torch.device("cpu"))
    restored.load_state_dict(step.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(params(step.model), params(restored.model)))
    assert restored.scheduler.last_epoch == 1 and restored.optimizer.param_groups[0]["lr"] == step.optimizer.param_groups[0]["lr"]
