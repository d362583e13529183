"""GCGAN's networks, augmentation, losses, EMA and training step, without Ray (CPU, tiny shapes).

Shapes at 32, 64, 256 and 1024 px; parameter counts equal to the authors' networks; spectral norm
where the authors put it; GCA/GCBlock, DiffAugment, hinge, reconstruction (L1 and LPIPS from a
user file) and EMA against hand computations; one step's gradient flow; and DDP on 2 gloo
processes: identical weights on both ranks after a step, D untouched by the G step.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
from torch import nn

from gan import Discriminator, GanStep, Generator, GeneratorEMA, ReconstructionLoss, real_batch
from gan.diffaug import diff_augment, translation
from gan.discriminator import crop_part, discriminator_gc_pairs
from gan.gc_block import GCA, GCBlock
from gan.generator import generator_gc_pairs
from gan.losses import d_fake_hinge, d_real_hinge, g_hinge
from medbalance.errors import ConfigError
from ray_jobs.gcgan.worker import ClassSampler


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size", [32, 64, 256])
def test_shapes(size):
    torch.manual_seed(0)
    g, d = Generator(size, ngf=16 if size == 256 else 64), Discriminator(size, ndf=16 if size == 256 else 64)
    big, small = g(torch.randn(2, 256))
    m = min(128, size // 2)
    assert big.shape == (2, 3, size, size) and small.shape == (2, 3, m, m)
    logits, recs = d([big, small], part=2)
    assert logits.shape == (2 * 2 * 25,) and [r.shape for r in recs] == [(2, 3, m, m)] * 3
    logits_real, none = d(torch.rand(2, 3, size, size) * 2 - 1)
    assert logits_real.shape == (100,) and none is None
    assert torch.isfinite(big).all() and torch.isfinite(logits).all()


def test_1024_builds_and_runs_one_image():
    torch.manual_seed(0)
    g, d = Generator(1024), Discriminator(1024)
    with torch.no_grad():
        big, small = g.eval()(torch.randn(1, 256))
        logits, recs = d.eval()([big, small], part=0)
    assert big.shape == (1, 3, 1024, 1024) and small.shape == (1, 3, 128, 128)
    assert big.abs().max() <= 1 and small.abs().max() <= 1  # tanh only at 1024
    assert logits.shape == (50,) and recs[0].shape == (1, 3, 128, 128)


def test_parameter_counts_match_the_authors_networks():
    """Counted from the authors' Generation_GCGAN/models.py (ngf = ndf = 64, nz = 256)."""
    assert count(Generator(256)) == 29_866_534 and count(Discriminator(256)) == 11_526_832
    assert count(Generator(1024)) == 29_917_792 and count(Discriminator(1024)) == 11_528_864


def test_gc_pairs_scale_down_below_256():
    assert generator_gc_pairs(1024) == [(4, 64), (8, 128), (16, 256), (32, 512)]
    assert generator_gc_pairs(256) == [(4, 64), (8, 128), (16, 256)]
    assert generator_gc_pairs(64) == [(4, 64)] and generator_gc_pairs(32) == [(4, 32)]
    assert discriminator_gc_pairs(256) == [(256, 32), (128, 16), (64, 8)]
    assert discriminator_gc_pairs(128) == [(128, 16), (64, 8)] and discriminator_gc_pairs(32) == [(32, 8)]
    with pytest.raises(ConfigError, match="not supported"):
        Generator(48)


def test_spectral_norm_on_every_conv_but_gca():
    for net in (Generator(64, ngf=16), Discriminator(64, ndf=16)):
        for name, module in net.named_modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                in_gca = ".gca." in f".{name}."
                assert hasattr(module, "parametrizations") != in_gca, name


def test_gca_is_x_plus_context_times_spatial_softmax():
    torch.manual_seed(0)
    gca = GCA(32)
    x = torch.randn(2, 32, 5, 5)
    ctx = gca.context(x)                                     # B x C x 1 x 1
    attention = torch.softmax(x.flatten(2), dim=2).view_as(x)
    torch.testing.assert_close(gca(x), x + ctx * attention)
    assert ctx.shape == (2, 32, 1, 1) and gca.context[1].out_channels == 2  # C / 16
    for conv in (gca.context[1], gca.context[3]):
        nn.init.zeros_(conv.weight)
    torch.testing.assert_close(gca(x), x)                    # no context: identity


def test_gc_block_gates_the_big_map_per_channel():
    torch.manual_seed(0)
    block = GCBlock(16, 8)
    small, big = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 32, 32)
    out = block(small, big)
    gate = out / big
    assert out.shape == big.shape
    assert torch.allclose(gate, gate[:, :, :1, :1].expand_as(gate), atol=1e-5)  # one value per channel
    assert (gate > 0).all() and (gate < 1).all()


def test_diffaugment_translation_shifts_and_fills_with_zeros():
    torch.manual_seed(1)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(8, 3, 1, 1) + 1   # no zeros in the input
    y = translation(x, ratio=0.25)                                  # shifts of -1, 0 or 1
    for img_in, img_out in zip(x, y):
        found = False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                expected = torch.zeros_like(img_in)
                src = img_in[:, max(0, -dy):4 - max(0, dy), max(0, -dx):4 - max(0, dx)]
                expected[:, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
                found |= torch.equal(img_out, expected)
        assert found
    z = torch.randn(4, 3, 16, 16, requires_grad=True)
    diff_augment(z).sum().backward()                                # differentiable
    assert z.grad is not None and torch.isfinite(z.grad).all()
    with pytest.raises(ConfigError, match="unknown DiffAugment"):
        diff_augment(z, "color,cutout")


def test_hinge_losses_with_random_targets():
    torch.manual_seed(0)
    zeros = torch.zeros(10_000)
    assert 0.899 < d_real_hinge(zeros).item() < 0.901   # mean of U(0.8, 1)
    assert 0.899 < d_fake_hinge(zeros).item() < 0.901
    assert d_real_hinge(torch.ones(100)).item() == 0.0   # t - 1 <= 0
    assert d_fake_hinge(-torch.ones(100)).item() == 0.0
    assert d_real_hinge(torch.full((100,), -1.0)).item() == pytest.approx(1.9, abs=0.02)
    assert g_hinge(torch.tensor([0.5, 1.5])).item() == -1.0


def test_l1_reconstruction_is_summed_over_the_batch():
    loss = ReconstructionLoss()
    real = torch.zeros(3, 3, 32, 32)
    recs = [torch.full((3, 3, 16, 16), 0.5)] * 3
    assert loss.name == "l1"
    assert loss(real, recs, part=1).item() == pytest.approx(3 * 3 * 0.5)   # 3 terms x 3 images x 0.5
    image = torch.arange(16.0).view(1, 1, 4, 4)
    assert crop_part(image, 3).flatten().tolist() == [10.0, 11.0, 14.0, 15.0]


def test_lpips_needs_a_user_given_vgg16_file(tmp_path):
    from torchvision.models import vgg16

    torch.manual_seed(0)
    path = tmp_path / "vgg16.pth"
    torch.save({k: v for k, v in vgg16(weights=None).state_dict().items() if k.startswith("features.")}, path)
    loss = ReconstructionLoss(str(path))
    assert loss.name == "lpips-vgg (vgg16.pth)"
    real, recs = torch.rand(2, 3, 32, 32) * 2 - 1, [torch.rand(2, 3, 16, 16) * 2 - 1 for _ in range(3)]
    assert torch.isfinite(loss(real, recs, 0)) and loss(real, [real[:, :, :16, :16]] * 3, 0) >= 0
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not a torchvision vgg16"):
        ReconstructionLoss(str(tmp_path / "other.pth"))
    with pytest.raises(ConfigError, match="does not exist"):
        ReconstructionLoss(str(tmp_path / "missing.pth"))


def test_ema_averages_parameters_only():
    g = Generator(32, ngf=4)
    ema = GeneratorEMA(g, decay=0.9)
    before = [p.clone() for p in ema.module.parameters()]
    buffers = [b.clone() for b in ema.module.buffers()]
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
        for b in g.buffers():
            b.add_(1.0) if b.is_floating_point() else None
    ema.update(g)
    for old, new, live in zip(before, ema.module.parameters(), g.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * live)
    for old, new in zip(buffers, ema.module.buffers()):
        assert torch.equal(old, new)
    ema.sync_buffers(g)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.buffers(), g.buffers()))


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_step_updates_each_network_only_in_its_own_step():
    torch.manual_seed(0)
    step = GanStep(Generator(32, ngf=8), Discriminator(32, ndf=8), ReconstructionLoss(), torch.device("cpu"))
    real = real_batch(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    g0, d0 = _params(step.generator), _params(step.discriminator)
    real_aug, fakes = step.generate_and_augment(real)
    out = step.d_step(real_aug, fakes)
    assert _same(g0, _params(step.generator)) and not _same(d0, _params(step.discriminator))
    assert all(p.grad is None for p in step.generator.parameters())
    d1 = _params(step.discriminator)
    for p in step.discriminator.parameters():
        p.grad = None
    out.update(step.g_step(fakes))
    assert _same(d1, _params(step.discriminator)) and not _same(g0, _params(step.generator))
    assert all(p.grad is None for p in step.discriminator.parameters())
    assert all(p.requires_grad for p in step.discriminator.parameters())
    assert all(torch.isfinite(v) for v in out.values())
    state = step.state_dict()
    assert {"g", "d", "g_ema", "opt_g", "opt_d", "scaler_g", "scaler_d"} <= set(state)


def test_class_sampler_walks_one_permutation_across_ranks():
    sampler = ClassSampler(10, seed=3)
    seen = torch.cat([sampler.indices(i, world=2, rank=r, batch_size=1) for i in range(5) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(10))                # one pass: every image once
    assert torch.equal(sampler.indices(7, 2, 1, 3), ClassSampler(10, seed=3).indices(7, 2, 1, 3))
    assert len(ClassSampler(1, 0).indices(5, 2, 1, 2)) == 2        # a class of one image still works


# ----------------------------------------------------------------------------- DDP on 2 gloo processes
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)                                            # same initial weights
    g, d = Generator(32, ngf=8), Discriminator(32, ndf=8)
    step = GanStep(g, d, ReconstructionLoss(), torch.device("cpu"), wrap=lambda m: DDP(m),
                   keep_ema=rank == 0)
    torch.manual_seed(100 + rank)                                   # different data and noise per rank
    real = real_batch(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    real_aug, fakes = step.generate_and_augment(real)
    step.d_step(real_aug, fakes)
    after_d = {"g": _params(g), "d": _params(d), "d_grads": [p.grad.clone() for p in d.parameters()]}
    step.g_step(fakes)
    after_g = {"g": _params(g), "d": _params(d), "d_grads": [p.grad.clone() for p in d.parameters()]}
    torch.save({"after_d": after_d, "after_g": after_g,
                "ema": _params(step.ema.module) if step.ema else None}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_gloo_workers_keep_identical_weights(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for stage in ("after_d", "after_g"):
        assert _same(r0[stage]["g"], r1[stage]["g"]) and _same(r0[stage]["d"], r1[stage]["d"]), stage
    torch.manual_seed(0)
    g_init = _params(Generator(32, ngf=8))
    assert _same(r0["after_d"]["g"], g_init)                         # the D step leaves G alone
    assert _same(r0["after_d"]["d"], r0["after_g"]["d"])             # the G step leaves D alone
    assert not _same(r0["after_g"]["g"], g_init)
    assert _same(r0["after_d"]["d_grads"], r0["after_g"]["d_grads"])  # ... and adds no gradient to D
    assert _same(r0["after_d"]["d_grads"], r1["after_d"]["d_grads"])  # D's gradients were all-reduced
    # EMA on rank 0 from the synchronised weights: 0.999 init + 0.001 after the step.
    expected = [0.999 * a + 0.001 * b for a, b in zip(g_init, r0["after_g"]["g"])]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(r0["ema"], expected)) and r1["ema"] is None
