"""Losses: hand-computed values (numpy float64 from the equations), limits, finite gradients, DDP sync."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses
from losses import create_loss, list_losses
from losses.cws import cws_term
from losses.fafl import frequency_offsets
from medbalance.errors import ConfigError, DataError

# 5 samples, 3 classes; batch counts (2, 2, 1); training-split counts (50, 20, 5)
LOGITS = np.array([[2.0, 0.5, -1.0],
                   [0.1, 1.2, 0.3],
                   [-0.5, 0.0, 1.5],
                   [1.0, 1.0, 0.0],
                   [0.3, -0.7, 0.2]])
TARGET = np.array([0, 1, 2, 1, 0])
# class 2 absent from this batch
TARGET_ABSENT = np.array([0, 1, 1, 0, 0])
COUNTS = [50, 20, 5]


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def loss_value(name, logits=LOGITS, target=TARGET, class_counts=COUNTS, **hp):
    return create_loss(name, class_counts, **hp)(t(logits), torch.tensor(target)).item()


# ----------------------------------------------------------------------------- numpy references
def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ce_ref(z, y):
    p = softmax(z)
    return np.mean([-math.log(p[i, y[i]]) for i in range(len(y))])


def cws_ref(z, y):
    p = softmax(z)
    num_classes = z.shape[1]
    total = 0.0
    for c in range(num_classes):
        rows = [i for i in range(len(y)) if y[i] == c]
        if rows:
            total += -math.log(sum(p[i, c] + 1e-7 for i in rows) / len(rows))
    return total / num_classes


def fafl_ref(z, y, m=0.5, alpha0=1.0, beta0=2.0, counts=None):
    num_classes = z.shape[1]
    n = np.bincount(y, minlength=num_classes) if counts is None else np.asarray(counts, dtype=float)
    f = np.array([m / n[k] ** 0.25 if n[k] > 0 else 0.0 for k in range(num_classes)])
    p = softmax(z)
    p_hat = softmax(z + f)
    terms = []
    for i in range(len(y)):
        pi, phi = p[i, y[i]], p_hat[i, y[i]]
        alpha, beta = alpha0 * (1 - pi), beta0 * pi
        terms.append(-alpha * (1 - phi) ** beta * math.log(phi))
    return np.mean(terms)


def focal_ref(z, y, gamma=2.0):
    p = softmax(z)
    return np.mean([-(1 - p[i, y[i]]) ** gamma * math.log(p[i, y[i]]) for i in range(len(y))])


def cb_weights_ref(counts, beta):
    w = np.array([(1 - beta) / (1 - beta ** n) for n in counts])
    return w / w.sum() * len(counts)


def cb_ref(z, y, counts, beta=0.9999, gamma=0.0):
    w = cb_weights_ref(counts, beta)
    p = softmax(z)
    return np.mean([w[y[i]] * -(1 - p[i, y[i]]) ** gamma * math.log(p[i, y[i]]) for i in range(len(y))])


def ldam_ref(z, y, counts, max_m=0.5, s=30.0, weights=None):
    margins = np.array([1 / n ** 0.25 for n in counts])
    margins = margins * max_m / margins.max()
    zz = z.copy()
    for i in range(len(y)):
        zz[i, y[i]] -= margins[y[i]]
    p = softmax(s * zz)
    losses_i = np.array([-math.log(p[i, y[i]]) for i in range(len(y))])
    if weights is None:
        return losses_i.mean()
    w = np.array([weights[y[i]] for i in range(len(y))])
    return (w * losses_i).sum() / w.sum()


def la_ref(z, y, counts, tau=1.0):
    prior = np.asarray(counts, dtype=float) / sum(counts)
    return ce_ref(z + tau * np.log(prior), y)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("target", [TARGET, TARGET_ABSENT], ids=["all-classes", "class-absent"])
def test_values_against_hand_computation(target):
    z, y = LOGITS, target
    tol = dict(rel=1e-5, abs=1e-6)
    assert loss_value("ce", z, y) == pytest.approx(ce_ref(z, y), **tol)
    assert cws_term(t(z), torch.tensor(y)).item() == pytest.approx(cws_ref(z, y), **tol)
    assert loss_value("cws", z, y) == pytest.approx(ce_ref(z, y) + cws_ref(z, y), **tol)
    assert loss_value("cws", z, y, weight=0.3) == pytest.approx(ce_ref(z, y) + 0.3 * cws_ref(z, y), **tol)
    assert loss_value("fafl", z, y) == pytest.approx(fafl_ref(z, y), **tol)
    assert loss_value("fafl", z, y, m=1.0, alpha0=3.0, beta0=0.5) == \
        pytest.approx(fafl_ref(z, y, m=1.0, alpha0=3.0, beta0=0.5), **tol)
    assert loss_value("fafl", z, y, counts="dataset") == pytest.approx(fafl_ref(z, y, counts=COUNTS), **tol)
    assert loss_value("focal", z, y) == pytest.approx(focal_ref(z, y, 2.0), **tol)
    assert loss_value("focal", z, y, gamma=0.5) == pytest.approx(focal_ref(z, y, 0.5), **tol)
    assert loss_value("class_balanced", z, y) == pytest.approx(cb_ref(z, y, COUNTS), **tol)
    assert loss_value("class_balanced", z, y, beta=0.99, base="focal", gamma=1.5) == \
        pytest.approx(cb_ref(z, y, COUNTS, beta=0.99, gamma=1.5), **tol)
    assert loss_value("ldam", z, y) == pytest.approx(ldam_ref(z, y, COUNTS), **tol)
    assert loss_value("ldam", z, y, max_m=0.3, s=2.0) == pytest.approx(ldam_ref(z, y, COUNTS, 0.3, 2.0), **tol)
    assert loss_value("balanced_softmax", z, y) == pytest.approx(la_ref(z, y, COUNTS), **tol)
    assert loss_value("logit_adjusted", z, y) == pytest.approx(la_ref(z, y, COUNTS), **tol)
    assert loss_value("logit_adjusted", z, y, tau=0.5) == pytest.approx(la_ref(z, y, COUNTS, 0.5), **tol)


def test_hand_written_cws_example():
    """Two classes, three samples; the numbers worked out by hand."""
    # p_0 = softmax([0, 0]) = (.5, .5), p_1 = softmax([ln 3, 0]) = (.75, .25), p_2 = softmax([0, ln 3]) = (.25, .75)
    z = t([[0.0, 0.0], [math.log(3), 0.0], [0.0, math.log(3)]])
    y = torch.tensor([0, 0, 1])
    # class 0: mean(.5, .75) = .625; class 1: .75  ->  L = (-log .625 - log .75) / 2 (+1e-7 inside)
    expected = (-math.log(0.625 + 1e-7) - math.log(0.75 + 1e-7)) / 2
    assert cws_term(z, y).item() == pytest.approx(expected, rel=1e-6)


def test_ldam_drw_switches_on_at_drw_epoch():
    loss = create_loss("ldam", COUNTS, drw_epoch=3)
    z, y = t(LOGITS), torch.tensor(TARGET)
    plain = ldam_ref(LOGITS, TARGET, COUNTS)
    reweighted = ldam_ref(LOGITS, TARGET, COUNTS, weights=cb_weights_ref(COUNTS, 0.9999))
    assert plain != pytest.approx(reweighted, rel=1e-3)
    for epoch, expected in [(0, plain), (2, plain), (3, reweighted), (7, reweighted)]:
        loss.set_epoch(epoch)
        assert loss(z, y).item() == pytest.approx(expected, rel=1e-5), epoch
    for off in (None, -1, -1.0):
        never = create_loss("ldam", COUNTS, drw_epoch=off)
        never.set_epoch(10_000)
        assert never(z, y).item() == pytest.approx(plain, rel=1e-5)
    assert create_loss("ldam", COUNTS, drw_epoch=160.0).drw_epoch == 160  # Tune may send floats


# ----------------------------------------------------------------------------- limits
def test_limits():
    z, y = LOGITS, TARGET
    ce = ce_ref(z, y)
    assert loss_value("focal", gamma=0.0) == pytest.approx(ce, rel=1e-6)
    assert loss_value("class_balanced", beta=0.0) == pytest.approx(ce, rel=1e-6)
    assert loss_value("class_balanced", beta=0.0, base="focal", gamma=0.0) == pytest.approx(ce, rel=1e-6)
    assert loss_value("balanced_softmax", class_counts=[7, 7, 7]) == pytest.approx(ce, rel=1e-6)
    assert loss_value("logit_adjusted", class_counts=[7, 7, 7], tau=2.0) == pytest.approx(ce, rel=1e-6)
    assert loss_value("logit_adjusted", tau=0.0) == pytest.approx(ce, rel=1e-6)
    assert loss_value("ldam", max_m=0.0, s=1.0) == pytest.approx(ce, rel=1e-6)
    assert loss_value("cws", weight=0.0) == pytest.approx(ce, rel=1e-6)
    # FAFL with m = 0 and beta0 = 0 is CE weighted by alpha0 * (1 - p_i)
    p = softmax(z)
    weighted = np.mean([(1 - p[i, y[i]]) * -math.log(p[i, y[i]]) for i in range(len(y))])
    assert loss_value("fafl", m=0.0, beta0=0.0) == pytest.approx(weighted, rel=1e-6)


def test_cws_one_sample_per_class():
    z = t(LOGITS[:3])
    y = torch.tensor([0, 1, 2])
    p = softmax(LOGITS[:3])
    expected = np.mean([-math.log(p[c, c] + 1e-7) for c in range(3)])
    assert cws_term(z, y).item() == pytest.approx(expected, rel=1e-6)


def test_cws_absent_class_counts_in_denominator():
    z, y = t(LOGITS[:2]), torch.tensor([0, 1])  # class 2 absent: (L_0 + L_1) / 3, not / 2
    p = softmax(LOGITS[:2])
    assert cws_term(z, y).item() == pytest.approx((-math.log(p[0, 0] + 1e-7) - math.log(p[1, 1] + 1e-7)) / 3,
                                                  rel=1e-6)


def test_fafl_offset_is_zero_for_absent_classes():
    offsets = frequency_offsets(torch.tensor([4.0, 0.0, 1.0, 16.0]), m=0.5)
    assert offsets.tolist() == pytest.approx([0.5 / 4 ** 0.25, 0.0, 0.5, 0.25])
    # and the loss with class 2 absent matches the reference, where f_2 = 0
    assert loss_value("fafl", target=TARGET_ABSENT) == pytest.approx(fafl_ref(LOGITS, TARGET_ABSENT), rel=1e-5)


def test_class_balanced_weights_sum_to_num_classes():
    loss = create_loss("class_balanced", COUNTS, beta=0.999)
    assert loss.class_weights.sum().item() == pytest.approx(3.0, rel=1e-6)
    assert loss.class_weights.tolist() == pytest.approx(cb_weights_ref(COUNTS, 0.999).tolist(), rel=1e-6)
    w = loss.class_weights.tolist()
    assert w[2] > w[1] > w[0]  # the rarest class weighs most


# ----------------------------------------------------------------------------- every registered loss
VARIANTS = [(name, {}) for name in list_losses()] + [
    ("fafl", {"counts": "dataset"}), ("class_balanced", {"base": "focal"}), ("ldam", {"drw_epoch": 0}),
    ("cws", {"sync": True}), ("fafl", {"sync": True})]


def test_registry_has_the_issue_losses():
    assert set(list_losses()) >= {"ce", "cws", "fafl", "focal", "class_balanced", "ldam", "balanced_softmax",
                                  "logit_adjusted"}
    assert losses.__all__ == ["create_loss", "list_losses", "register_loss"]


@pytest.mark.parametrize("name,hp", VARIANTS, ids=lambda v: str(v))
def test_finite_gradients_at_extreme_logits(name, hp):
    loss = create_loss(name, COUNTS, **hp)
    loss.set_epoch(1)
    z = t([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [1e4, -1e4, -1e4], [0.0, 0.0, 1e4], [-1e4, -1e4, 1e4]])
    z.requires_grad_(True)
    # correct, correct, wrong (class 2 gets -1e4), wrong, correct: saturated both ways
    value = loss(z, torch.tensor([0, 1, 2, 1, 2]))
    value.backward()
    assert value.ndim == 0 and value.dtype == torch.float32
    assert torch.isfinite(value) and torch.isfinite(z.grad).all(), (value, z.grad)


@pytest.mark.parametrize("name,hp", VARIANTS, ids=lambda v: str(v))
def test_finite_gradients_under_bf16_autocast(name, hp):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    features = torch.randn(6, 8) * 50
    loss = create_loss(name, COUNTS, **hp)
    loss.set_epoch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features)
        assert logits.dtype == torch.bfloat16
        value = loss(logits, torch.tensor([0, 1, 2, 0, 1, 2]))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    assert any(p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,hp", VARIANTS, ids=lambda v: str(v))
def test_cuda_bf16_autocast_matches_cpu(name, hp):
    loss = create_loss(name, COUNTS, **hp).cuda()
    loss.set_epoch(1)
    z = t(LOGITS).cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = loss(z.to(torch.bfloat16), torch.tensor(TARGET).cuda())
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(z.grad).all()
    cpu = create_loss(name, COUNTS, **hp)
    cpu.set_epoch(1)
    expected = cpu(t(LOGITS).to(torch.bfloat16), torch.tensor(TARGET)).item()
    assert value.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", list_losses())
def test_every_loss_has_set_epoch_and_checks_targets(name):
    loss = create_loss(name, COUNTS)
    loss.set_epoch(0)
    with pytest.raises(DataError, match=r"outside \[0, 3\)"):
        loss(t(LOGITS), torch.tensor([0, 1, 3, 0, 0]))
    with pytest.raises(DataError, match="columns"):
        loss(t(LOGITS[:, :2]), torch.tensor([0, 1, 1, 0, 0]))
    with pytest.raises(DataError, match="integer"):
        loss(t(LOGITS), t([0.0, 1.0, 2.0, 0.0, 0.0]))
    with pytest.raises(DataError, match="rows"):
        loss(t(LOGITS), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- configuration errors
def test_unknown_name_lists_known_losses():
    with pytest.raises(ConfigError, match="unknown loss 'nope'.*balanced_softmax, ce, class_balanced"):
        create_loss("nope", COUNTS)


def test_unknown_hyperparameter_lists_accepted():
    with pytest.raises(ConfigError, match=r"no hyperparameter\(s\) \['alpha'\].*gamma=2.0"):
        create_loss("focal", COUNTS, alpha=0.25)
    with pytest.raises(ConfigError, match="Accepted.*none"):
        create_loss("ce", COUNTS, gamma=1.0)


@pytest.mark.parametrize("name,hp", [
    ("focal", {"gamma": -1.0}), ("focal", {"gamma": "2"}), ("focal", {"gamma": float("nan")}),
    ("class_balanced", {"beta": 1.0}), ("class_balanced", {"base": "nll"}), ("class_balanced", {"gamma": 2.0}),
    ("fafl", {"counts": "epoch"}), ("fafl", {"alpha0": 0.0}), ("fafl", {"counts": "dataset", "sync": True}),
    ("fafl", {"sync": "yes"}), ("cws", {"weight": -0.1}), ("ldam", {"s": 0.0}), ("ldam", {"drw_epoch": 2.5}),
    ("ldam", {"drw_epoch": -3}), ("logit_adjusted", {"tau": -1.0})])
def test_bad_hyperparameter_values(name, hp):
    with pytest.raises(ConfigError):
        create_loss(name, COUNTS, **hp)


@pytest.mark.parametrize("name,hp", [("class_balanced", {}), ("ldam", {}), ("balanced_softmax", {}),
                                     ("logit_adjusted", {}), ("fafl", {"counts": "dataset"})])
def test_zero_count_rejected_where_it_would_be_infinite(name, hp):
    with pytest.raises(DataError, match=r"class\(es\) \[1\] have 0 samples in the training split"):
        create_loss(name, [10, 0, 3], **hp)
    with pytest.raises(ConfigError, match="needs class_counts"):
        create_loss(name, None, **hp)


@pytest.mark.parametrize("name", ["ce", "cws", "focal", "fafl"])
def test_zero_count_fine_where_counts_unused(name):
    value = create_loss(name, [10, 0, 3])(t(LOGITS), torch.tensor(TARGET_ABSENT))
    assert torch.isfinite(value)


def test_bad_class_counts():
    for bad in ([3, -1, 2], [2.5, 3, 1], [5], [[1, 2], [3, 4]]):
        with pytest.raises(DataError, match="class_counts"):
            create_loss("ldam", bad)


# ----------------------------------------------------------------------------- DDP sync (2 processes, gloo)
GLOBAL_LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3], [-0.5, 0.0, 1.5], [1.0, 1.0, 0.0],
                          [0.3, -0.7, 0.2], [0.0, 2.0, 0.5], [1.5, -0.2, 0.4], [-1.0, 0.5, 0.5]])
# rank 0 gets rows 0-3 (classes 0, 1, 2, 1), rank 1 rows 4-7 (classes 0, 1, 0, 0): per-worker counts differ
GLOBAL_TARGET = np.array([0, 1, 2, 1, 0, 1, 0, 0])
WORLD = 2


def _sync_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * 4, rank * 4 + 4)
        results = {}
        for key, fn in [
            ("cws_sync", lambda z, y: cws_term(z, y, sync=True)),
            ("cws_local", lambda z, y: cws_term(z, y, sync=False)),
            ("fafl_sync", create_loss("fafl", COUNTS, sync=True)),
            ("fafl_local", create_loss("fafl", COUNTS)),
            ("cws_loss_sync", create_loss("cws", COUNTS, sync=True, weight=0.5)),
        ]:
            z = torch.tensor(GLOBAL_LOGITS[rows], dtype=torch.float32, requires_grad=True)
            value = fn(z, torch.tensor(GLOBAL_TARGET[rows]))
            value.backward()
            results[key] = value.detach()
            results[key + "_grad"] = z.grad.detach()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_sync_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process(fn):
    z = torch.tensor(GLOBAL_LOGITS, dtype=torch.float32, requires_grad=True)
    value = fn(z, torch.tensor(GLOBAL_TARGET))
    value.backward()
    return value.item(), z.grad


def test_cws_sync_equals_single_process_global_batch(sync_results):
    full, full_grad = _single_process(cws_term)
    assert full == pytest.approx(cws_ref(GLOBAL_LOGITS, GLOBAL_TARGET), rel=1e-6)
    for rank, res in enumerate(sync_results):
        # every worker computes the global batch's CWS term
        assert res["cws_sync"].item() == pytest.approx(full, rel=1e-6)
        # gradients flow back through the all-reduce: world_size x the global gradient of this
        # worker's rows, which DDP's averaging over workers turns into exactly the global gradient
        torch.testing.assert_close(res["cws_sync_grad"], WORLD * full_grad[rank * 4: rank * 4 + 4])
    # default (per worker) is each worker's own local term, which differs here
    for rank, res in enumerate(sync_results):
        local = cws_ref(GLOBAL_LOGITS[rank * 4: rank * 4 + 4], GLOBAL_TARGET[rank * 4: rank * 4 + 4])
        assert res["cws_local"].item() == pytest.approx(local, rel=1e-6)
        assert local != pytest.approx(full, rel=1e-3)


def test_cws_loss_sync_is_local_ce_plus_global_cws(sync_results):
    full_cws = cws_ref(GLOBAL_LOGITS, GLOBAL_TARGET)
    for rank, res in enumerate(sync_results):
        rows = slice(rank * 4, rank * 4 + 4)
        assert res["cws_loss_sync"].item() == pytest.approx(
            ce_ref(GLOBAL_LOGITS[rows], GLOBAL_TARGET[rows]) + 0.5 * full_cws, rel=1e-6)


def test_fafl_sync_mean_over_workers_equals_single_process(sync_results):
    fafl = create_loss("fafl", COUNTS)
    full, full_grad = _single_process(fafl)
    assert full == pytest.approx(fafl_ref(GLOBAL_LOGITS, GLOBAL_TARGET), rel=1e-5)
    # n_k are global, the mean over i per worker: with equal per-worker batch sizes the average of
    # the workers' losses is the global-batch loss, and each worker's gradient is world_size x its
    # rows of the global gradient (DDP averages them back to the global gradient)
    assert np.mean([res["fafl_sync"].item() for res in sync_results]) == pytest.approx(full, rel=1e-6)
    for rank, res in enumerate(sync_results):
        torch.testing.assert_close(res["fafl_sync_grad"], WORLD * full_grad[rank * 4: rank * 4 + 4])
    # without sync the per-worker counts give a different value
    unsynced = np.mean([res["fafl_local"].item() for res in sync_results])
    assert unsynced != pytest.approx(full, rel=1e-4)
    assert unsynced == pytest.approx(np.mean([fafl_ref(GLOBAL_LOGITS[r * 4: r * 4 + 4],
                                                       GLOBAL_TARGET[r * 4: r * 4 + 4]) for r in range(WORLD)]),
                                     rel=1e-5)


def test_sync_is_identity_without_process_group():
    z, y = t(LOGITS), torch.tensor(TARGET)
    assert cws_term(z, y, sync=True).item() == pytest.approx(cws_term(z, y).item())
    synced = create_loss("fafl", COUNTS, sync=True)(z, y).item()
    assert synced == pytest.approx(create_loss("fafl", COUNTS)(z, y).item())


def test_ce_matches_torch():
    z, y = t(LOGITS), torch.tensor(TARGET)
    assert create_loss("ce", COUNTS)(z, y).item() == pytest.approx(F.cross_entropy(z, y).item())
