"""Tests of models/: every registered classifier (timm-style), the ADSR parts, weight loading.

Tiny inputs (batch 2, 64 x 64) so the file runs in about a minute on 2 CPU cores.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from medbalance.errors import ConfigError
from models import create_model, list_models, register_model
from models.adsr import ADSR, GSA, PSF
from models.pretrained import load_pretrained
from models.style import STYLE_EPS, channel_style, pixel_style

NUM_CLASSES = 7
ALL_MODELS = list_models()
EXPECTED_MODELS = {"resnet18", "resnet34", "resnet50", "adsr_resnet18", "adsr_resnet34",
                   "adsr_resnet50", "lrf_cnn", "se_resnet50", "srm_resnet50", "cabnet50"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: the 2 shared cores are often busy, and spinning OpenMP threads on an
    oversubscribed machine make these tiny tensors 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, **kwargs)


def images(size: int = 64, batch: int = 2, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- registry

def test_registry_names():
    assert EXPECTED_MODELS <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS)


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError, match="unknown model 'resnet5'.*adsr_resnet50.*resnet50"):
        create_model("resnet5", num_classes=3)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="resnet18.*gsa"):
        create_model("resnet18", num_classes=3, gsa="channelwise")
    with pytest.raises(ConfigError, match="gsa='fast'"):
        create_model("adsr_resnet18", num_classes=3, gsa="fast")
    with pytest.raises(ConfigError, match="psf_kernels"):
        create_model("adsr_resnet18", num_classes=3, psf_kernels=(1, 2))
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet18", num_classes=-1)
    with pytest.raises(ConfigError, match="in_chans"):
        create_model("resnet18", num_classes=3, in_chans=0)
    with pytest.raises(ConfigError, match="cabnet50 needs num_classes >= 1"):
        create_model("cabnet50", num_classes=0)


def test_register_twice_is_a_bug():
    def resnet18(num_classes, in_chans=3):  # same name as the real one
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="registered twice"):
        register_model(resnet18)


# ---------------------------------------------------------------------------- every model

@pytest.mark.parametrize("name", ALL_MODELS)
def test_train_step_shapes_and_gradients(name):
    model = build(name).train()
    x = images()
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features)
    logits = model.forward_head(features)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_eval_is_deterministic_and_forward_is_head_of_features(name):
    model = build(name).eval()
    x = images()
    with torch.no_grad():
        first, second = model(x), model(x)
        split = model.forward_head(model.forward_features(x))
    assert torch.equal(first, second)
    torch.testing.assert_close(first, split, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_channels_last_bf16_autocast_and_sync_batchnorm(name):
    model = build(name).eval()
    x = images()
    with torch.no_grad():
        reference = model(x)
        scale = reference.abs().max()

        nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = nhwc(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * scale)

        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        assert torch.isfinite(out.float()).all()
        assert (out.float() - reference).abs().max() <= 0.1 * scale + 1e-3

        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
        assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
        assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
        # Eval-mode SyncBatchNorm uses running stats: no process group needed.
        torch.testing.assert_close(synced(x), reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_reset_classifier_and_in_chans(name):
    model = build(name, in_chans=1).eval()
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(images(channels=1)).shape == (2, 3)
    if name == "cabnet50":
        with pytest.raises(ConfigError):
            model.reset_classifier(0)
    else:
        model.reset_classifier(0)
        with torch.no_grad():
            assert model(images(channels=1)).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_in_chans_1_trains(name):
    """A grey (1-channel) model, as ``data.channels: 1`` builds it: every parameter gets a finite
    gradient, the stem included, at 32 x 32 (the smallest size the training job allows is 8)."""
    model = build(name, in_chans=1).train()
    assert model.in_chans == 1
    logits = model(images(size=32, channels=1))
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
    logits.sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name}: {pname}"
    stem = next(p for n, p in model.named_parameters() if p.ndim == 4)  # the first conv
    assert stem.shape[1] == 1 and stem.grad.abs().sum() > 0


def _default_conv_std(conv: nn.Conv2d) -> float:
    """PyTorch's default Conv2d init: Kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))."""
    fan_in = conv.weight[0].numel()
    return 1 / np.sqrt(fan_in) / np.sqrt(3)


def test_authors_init_is_the_default_and_ours_an_option():
    from models.adsr import StyleMix

    authors, ours = build("adsr_resnet50"), build("adsr_resnet50", init="ours")
    for model, rule in ((authors, "authors"), (ours, "ours")):
        mixes = [m for m in model.modules() if isinstance(m, StyleMix)]
        big = max(mixes, key=lambda m: m.weight.numel())  # 1024 channels: a tight std estimate
        fan_out_std = np.sqrt(2 / (big.out_channels * 2))
        expected = _default_conv_std(big) if rule == "authors" else fan_out_std
        assert big.weight.std().item() == pytest.approx(expected, rel=0.02), rule
        assert all(torch.all(m.bias == 0) for m in mixes)
        fc_std = model.fc.weight.std().item()
        if rule == "authors":  # Kaiming-normal (fan_in), bias 0
            assert fc_std == pytest.approx(np.sqrt(2 / 2048), rel=0.1) and torch.all(model.fc.bias == 0)
            down = model.layer1[0].downsample[0]  # their init loop skips keys without "conv"
            assert down.weight.abs().max().item() <= 1 / np.sqrt(down.weight[0].numel())
        else:  # nn.Linear's default: U(+-1/sqrt(fan_in))
            assert fc_std == pytest.approx(1 / np.sqrt(2048) / np.sqrt(3), rel=0.1)
    for rule in ("authors", "ours"):
        lrf = build("lrf_cnn", init=rule)
        conv = lrf.stages[2][1].branch3[2][0]  # a 3x3 dilated 384-channel conv
        expected = _default_conv_std(conv) if rule == "authors" else np.sqrt(2 / (conv.out_channels * 9))
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.02), rule
    with pytest.raises(ConfigError, match="init='theirs'"):
        create_model("lrf_cnn", num_classes=2, init="theirs")


def test_paper_exact_is_the_published_network():
    model = build("adsr_resnet18", paper_exact=True)
    psf = model.layer1[0].adsr.psf
    assert psf.kernels == (1, 3, 3) and sorted(psf.convs) == ["k1", "k3"]
    assert model.layer1[0].adsr.init == "authors" and model.layer1[0].adsr.gsa.mode == "faithful"
    assert build("adsr_resnet18").layer1[0].adsr.psf.kernels == (1, 3, 7)  # our default stays
    with pytest.raises(ConfigError, match="paper_exact=True .* cannot be combined with .*channelwise"):
        build("adsr_resnet18", paper_exact=True, gsa="channelwise")


@pytest.mark.parametrize("name", ["resnet18", "adsr_resnet18", "lrf_cnn"])
def test_output_shape_at_224(name):
    model = build(name).eval()
    with torch.no_grad():
        out = model(images(size=224, batch=1))
    assert out.shape == (1, NUM_CLASSES) and torch.isfinite(out).all()


def test_lrf_cnn_at_299():
    model = build("lrf_cnn").eval()
    with torch.no_grad():
        features = model.forward_features(images(size=299, batch=1))
    assert features.shape == (1, 384) and torch.isfinite(features).all()


def test_adsr_resnet_finite_when_last_stage_is_1x1():
    model = build("adsr_resnet18").train()  # 32 x 32 input -> layer4 is 1 x 1
    out = model(images(size=32))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------- style pooling

def test_channel_style_matches_numpy_float64():
    x = torch.tensor([[[[1.0, 2.0, 4.0], [8.0, -3.0, 0.5]],
                       [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]]])  # 1 x 2 x 2 x 3
    got = channel_style(x)
    assert got.shape == (1, 2, 2, 1)
    values = x.double().numpy().reshape(2, 6)
    mean = values.sum(axis=1) / 6
    var = ((values - mean[:, None]) ** 2).sum(axis=1) / 5  # unbiased: n - 1
    std = np.sqrt(var + 1e-5)
    np.testing.assert_allclose(got[0, :, 0, 0].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(got[0, :, 1, 0].numpy(), std, rtol=1e-6)


def test_pixel_style_matches_numpy_float64():
    x = torch.tensor([[[[1.0, -2.0]], [[3.0, 5.0]], [[-4.0, 0.5]]]])  # 1 x 3 x 1 x 2
    got = pixel_style(x)
    assert got.shape == (1, 3, 1, 2)
    values = x.double().numpy()[0, :, 0, :]  # C x W
    mean = values.mean(axis=0)
    std = np.sqrt(values.var(axis=0, ddof=1) + 1e-5)
    np.testing.assert_allclose(got[0, 0, 0].numpy(), values.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(got[0, 1, 0].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(got[0, 2, 0].numpy(), std, rtol=1e-6)


def test_constant_input_gives_std_sqrt_eps_and_no_nan():
    x = torch.full((2, 5, 4, 4), 3.0)
    style = channel_style(x)
    torch.testing.assert_close(style[:, :, 0], torch.full((2, 5, 1), 3.0))
    torch.testing.assert_close(style[:, :, 1], torch.full((2, 5, 1), STYLE_EPS ** 0.5))
    torch.testing.assert_close(pixel_style(x)[:, 2], torch.full((2, 4, 4), STYLE_EPS ** 0.5))
    for gsa in ("faithful", "channelwise"):
        module = ADSR(5, gsa=gsa).train()
        assert torch.isfinite(module(x)).all()
        assert torch.isfinite(module.eval()(x)).all()


# ---------------------------------------------------------------------------- GSA and PSF

def test_gsa_against_hand_computation_with_odd_channels():
    torch.manual_seed(0)
    channels, split = 5, (2, 3)  # odd: C // 2 = 2 and the rest = 3
    gsa = GSA(channels).eval()
    with torch.no_grad():  # depthwise convs -> identity, BN (eval) -> identity
        for local in (gsa.local1, gsa.local2):
            conv, bn = local[0], local[1]
            conv.weight.zero_()
            conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
            bn.running_var.fill_(1.0 - bn.eps)
        gsa.mix1.bias.uniform_(-1, 1)
        gsa.mix2.bias.uniform_(-1, 1)
    x = torch.rand(2, channels, 4, 6) + 0.1  # positive, so the ReLU is the identity
    with torch.no_grad():
        out = gsa(x)

    values = x.double().numpy().reshape(2, channels, -1)
    mean = values.mean(axis=2)
    std = np.sqrt(values.var(axis=2, ddof=1) + 1e-5)
    gates = []
    for half, mix in zip((slice(0, split[0]), slice(split[0], channels)), (gsa.mix1, gsa.mix2)):
        w = mix.weight.detach().double().numpy()[:, :, :, 0]  # C_i x C_i x 2 (mean tap, std tap)
        b = mix.bias.detach().double().numpy()
        z = (np.einsum("oi,bi->bo", w[:, :, 0], mean[:, half])
             + np.einsum("oi,bi->bo", w[:, :, 1], std[:, half]) + b)
        gates.append(1 / (1 + np.exp(-z)))
    expected = x.double().numpy() * np.concatenate(gates, axis=1)[:, :, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", [(1, 3, 7), (1, 3, 3)])
def test_psf_initial_gate_is_half(kernels):
    psf = PSF(kernels)
    assert torch.all(psf.norm.weight == 0) and torch.all(psf.norm.bias == 0)
    x = torch.randn(2, 6, 5, 5)
    for mode in (psf.train(), psf.eval()):
        assert torch.equal(mode(x), x * 0.5)


@pytest.mark.parametrize("kernels", [(1, 3, 7), (1, 3, 3)])
def test_psf_against_hand_computation(kernels):
    torch.manual_seed(0)
    psf = PSF(kernels).eval()
    distinct = list(dict.fromkeys(kernels))
    assert list(psf.convs) == [f"k{k}" for k in distinct]  # (1, 3, 3): one 3x3 branch, used twice
    assert psf.norm.momentum == 0.01
    with torch.no_grad():
        psf.norm.weight.copy_(torch.tensor([1.5, -0.7, 0.9][:len(distinct)]))
        psf.norm.bias.copy_(torch.tensor([0.2, 0.1, -0.3][:len(distinct)]))
        psf.norm.running_mean.copy_(torch.tensor([0.05, -0.1, 0.2][:len(distinct)]))
        psf.norm.running_var.copy_(torch.tensor([1.2, 0.8, 2.0][:len(distinct)]))
        x = torch.randn(2, 4, 6, 6)
        style = pixel_style(x)
        branch = {}
        for i, k in enumerate(distinct):  # BN_k(conv_k(s)), eval-mode BN written out
            y = torch.nn.functional.conv2d(style, psf.convs[f"k{k}"].weight, padding=k // 2)
            branch[k] = ((y - psf.norm.running_mean[i]) / torch.sqrt(psf.norm.running_var[i] + 1e-5)
                         * psf.norm.weight[i] + psf.norm.bias[i])
        fused = sum(branch[k] for k in kernels) / 3  # authors' form: (A + B3 + B3) / 3
        torch.testing.assert_close(psf(x), x * torch.sigmoid(fused))


def adsr_param_formula(channels: int, gsa: str, kernels=(1, 3, 7)) -> int:
    """Closed form from the layer definitions in models/adsr.py."""
    c1, c2 = channels // 2, channels - channels // 2
    local = (3 * 3 * c1 + 2 * c1) + (7 * 7 * c2 + 2 * c2)  # depthwise convs (no bias) + BN
    if gsa == "faithful":  # Conv2d(C_i, C_i, (2, 1), bias): 2 C_i^2 + C_i
        mix = (2 * c1 * c1 + c1) + (2 * c2 * c2 + c2)
    else:  # depthwise (2, 1) conv without bias (2 C_i) + BN (2 C_i)
        mix = 4 * c1 + 4 * c2
    psf = sum(3 * k * k + 2 for k in set(kernels))  # conv 3 -> 1 (no bias) + BN(1)
    return local + mix + psf


@pytest.mark.parametrize("channels", [64, 65, 2048])
@pytest.mark.parametrize("gsa", ["faithful", "channelwise"])
def test_adsr_parameter_count_formula(channels, gsa):
    module = ADSR(channels, gsa=gsa)
    assert sum(p.numel() for p in module.parameters()) == adsr_param_formula(channels, gsa)
    authors = ADSR(channels, gsa=gsa, psf_kernels=(1, 3, 3))
    assert (sum(p.numel() for p in authors.parameters())
            == adsr_param_formula(channels, gsa, (1, 3, 3)))


def test_adsr_parameter_count_faithful_2048():
    # 9*1024 + 2048 + 49*1024 + 2048 + 2*(2*1024^2 + 1024) + (3*(1 + 9 + 49) + 3*2)
    assert adsr_param_formula(2048, "faithful") == 4_260_023


def test_adsr_resnet50_overhead_is_sixteen_modules():
    stages = [(256, 3), (512, 4), (1024, 6), (2048, 3)]  # Bottleneck output widths x blocks
    base = sum(p.numel() for p in build("resnet50").parameters())
    for gsa in ("faithful", "channelwise"):
        model = build("adsr_resnet50", gsa=gsa)
        extra = sum(p.numel() for p in model.parameters()) - base
        assert extra == sum(n * adsr_param_formula(c, gsa) for c, n in stages)


def test_adsr_resnet_init_and_placement():
    model = build("adsr_resnet18").eval()
    for mname, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            expected = 0.0 if ".psf." in mname else 1.0
            assert torch.all(m.weight == expected), mname
    # Removing every ADSR module gives torchvision's ResNet-18 with the same weights.
    plain = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".adsr." in k for k in unexpected)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            block.adsr = nn.Identity()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))


# ---------------------------------------------------------------------------- pretrained

@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_pretrained_into_adsr_resnet18(resnet18_file):
    path, state = resnet18_file
    model = create_model("adsr_resnet18", num_classes=5)
    report = load_pretrained(model, path, "adsr_resnet18")
    loaded = model.state_dict()
    torch.testing.assert_close(loaded["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(loaded["bn1.running_var"], state["bn1.running_var"])
    assert loaded["fc.weight"].shape == (5, 512)
    assert sorted(report.classifier) == ["fc.bias", "fc.weight"]
    assert report.missing and all(".adsr." in k for k in report.missing)
    assert set(report.missing) == {k for k in loaded if ".adsr." in k}
    assert not report.unexpected and not report.mismatched and not report.adapted


def test_pretrained_into_resnet18_via_create_model(resnet18_file, caplog):
    path, state = resnet18_file
    with caplog.at_level(logging.INFO, logger="models.pretrained"):
        model = create_model("resnet18", num_classes=5, pretrained=path)
    loaded = model.state_dict()
    for key, tensor in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], tensor), key
    assert not torch.equal(loaded["fc.bias"], state["fc.bias"][:5])
    assert f"loaded {len(state) - 2} tensors" in caplog.text
    assert "missing (kept at init): []" in caplog.text


def test_pretrained_in_chans_1_sums_rgb_filters(resnet18_file):
    path, state = resnet18_file
    model = create_model("resnet18", num_classes=2, in_chans=1)
    report = load_pretrained(model, path)
    assert report.adapted == ["conv1.weight"]
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    model = create_model("resnet18", num_classes=2, in_chans=4)
    load_pretrained(model, path)
    w = state["conv1.weight"]
    torch.testing.assert_close(model.conv1.weight,
                               torch.cat([w, w[:, :1]], dim=1) * 0.75)


def test_pretrained_checkpoint_and_ddp_layouts(resnet18_file, tmp_path):
    path, state = resnet18_file
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    model = create_model("resnet18", num_classes=5, pretrained=wrapped)
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_pretrained_bad_files_are_config_errors(resnet18_file, tmp_path):
    path, _ = resnet18_file
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a torch file at all" * 10)
    with pytest.raises(ConfigError, match="garbage.pth.*cannot be read"):
        create_model("resnet18", num_classes=5, pretrained=garbage)
    a_list = tmp_path / "list.pth"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(ConfigError, match="list.pth.*not a state dict"):
        create_model("resnet18", num_classes=5, pretrained=a_list)
    with pytest.raises(ConfigError, match="missing.pth.*does not exist"):
        create_model("resnet18", num_classes=5, pretrained=tmp_path / "missing.pth")
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, unrelated)
    with pytest.raises(ConfigError, match="unrelated.pth.*none of its 1 tensors match"):
        create_model("resnet18", num_classes=5, pretrained=unrelated)
    with pytest.raises(ConfigError, match="resnet18.pth.*none of its .* match lrf_cnn"):
        create_model("lrf_cnn", num_classes=5, pretrained=path)
