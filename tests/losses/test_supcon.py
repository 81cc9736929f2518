"""Self-paced supervised contrastive loss (Peng et al. 2021, Eq. 2, 3, 7, 14) against an independent NumPy reference
written with explicit loops over anchors i and pairs j, plus invariants. Tiny inputs only (N <= 6, D = 4)."""
import math

import numpy as np
import pytest
import torch

from nnunet_contrastive.losses import (
    SelfPacedSupConLoss,
    SupConOutput,
    pair_loss_matrix,
    self_paced_weights,
    supcon_loss,
)
from nnunet_contrastive.losses.reference import per_label_loop_supcon
from nnunet_contrastive.framework.schedules import pair_loss_bounds

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------------------
# independent NumPy reference: explicit double loops, float64
# ------------------------------------------------------------------------------------------------------------------
def np_supcon(z1, z2, labels, tau, gamma=None, mode="linear"):
    """One meta-label. labels: (N,) ints or None (SimCLR). Returns (loss, mean weight, frac non-zero, pair loss dict)."""
    z1 = np.asarray(z1, dtype=np.float64)
    z2 = np.asarray(z2, dtype=np.float64)
    n = z1.shape[0]
    views = [v / np.linalg.norm(v) for v in list(z1) + list(z2)]
    sample = [a % n for a in range(2 * n)]
    lab = [sample[a] if labels is None else int(labels[sample[a]]) for a in range(2 * n)]
    total, w_sum, nz, count = 0.0, 0.0, 0, 0
    pair_loss = {}
    for i in range(2 * n):
        denom = 0.0
        for a in range(2 * n):
            if a != i:
                denom += math.exp(float(views[i] @ views[a]) / tau)
        s, n_pos = 0.0, 0
        for j in range(2 * n):
            if j == i:
                continue
            same = lab[j] == lab[i] or sample[j] == sample[i]
            if not same:
                continue
            l_ij = -math.log(math.exp(float(views[i] @ views[j]) / tau) / denom)
            pair_loss[(i, j)] = l_ij
            if gamma is None:
                w = 1.0
            elif mode == "hard":
                w = 1.0 if l_ij <= gamma else 0.0
            else:
                w = max(1.0 - l_ij / gamma, 0.0)
            s += w * l_ij
            n_pos += 1
            w_sum += w
            nz += w > 0
            count += 1
        total += s / n_pos
    return total / (2 * n), w_sum / count, nz / count, pair_loss


def _inputs(seed, n=4, d=4, n_classes=2, m=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype)
    z2 = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, n_classes, (n, m), generator=g)
    return z1, z2, labels


def _median_pair_loss(z1, z2, labels, tau):
    _, _, _, pl = np_supcon(z1.numpy(), z2.numpy(), labels, tau)
    return float(np.median(list(pl.values())))


# ------------------------------------------------------------------------------------------------------------------
# agreement with the loop reference
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,n,tau", [(0, 3, 0.07), (1, 4, 0.5), (2, 5, 0.2), (3, 5, 1.0)])
def test_plain_supcon_matches_numpy_loops(seed, n, tau):
    z1, z2, labels = _inputs(seed, n=n)
    ref, mw, nz, _ = np_supcon(z1.numpy(), z2.numpy(), labels[:, 0].numpy(), tau)
    out = supcon_loss(z1, z2, labels[:, 0], temperature=tau)
    assert isinstance(out, SupConOutput)
    torch.testing.assert_close(out.loss, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert out.mean_weight.item() == 1.0 and out.frac_nonzero_weight.item() == 1.0 and mw == 1.0 and nz == 1.0


@pytest.mark.parametrize("mode", ["hard", "linear", "soft"])
@pytest.mark.parametrize("seed,n,tau", [(4, 3, 0.5), (5, 5, 0.1), (6, 4, 0.3)])
def test_self_paced_matches_numpy_loops(mode, seed, n, tau):
    z1, z2, labels = _inputs(seed, n=n)
    y = labels[:, 0].numpy()
    gamma = _median_pair_loss(z1, z2, y, tau)  # some pairs in, some out
    ref_mode = "linear" if mode == "soft" else mode
    ref, mw, nz, _ = np_supcon(z1.numpy(), z2.numpy(), y, tau, gamma=gamma, mode=ref_mode)
    out = supcon_loss(z1, z2, labels, temperature=tau, gamma=gamma, weighting=mode)
    assert 0.0 < nz < 1.0  # the test really exercises pacing
    torch.testing.assert_close(out.loss, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.mean_weight, torch.tensor([mw], dtype=torch.float64))
    torch.testing.assert_close(out.frac_nonzero_weight, torch.tensor([nz], dtype=torch.float64))


def test_float32_matches_numpy_and_pair_loss_matrix():
    z1, z2, labels = _inputs(7, n=5, dtype=torch.float32)
    tau = 0.07
    ref, _, _, pl = np_supcon(z1.numpy(), z2.numpy(), labels[:, 0].numpy(), tau)
    out = supcon_loss(z1, z2, labels[:, 0])  # default temperature is 0.07
    assert out.loss.dtype == torch.float32
    assert math.isclose(out.loss.item(), ref, rel_tol=1e-5, abs_tol=1e-5)
    mat = pair_loss_matrix(z1, z2, tau)
    assert mat.shape == (10, 10) and torch.isinf(mat.diagonal()).all()
    for (i, j), l_ij in pl.items():
        assert math.isclose(mat[i, j].item(), l_ij, rel_tol=1e-5, abs_tol=1e-5)


def test_multi_label_equals_weighted_sum_of_single_labels():
    z1, z2, labels = _inputs(8, n=5, n_classes=2, m=3)
    tau, lambdas = 0.3, [1.0, 0.1, 0.25]
    gammas = [_median_pair_loss(z1, z2, labels[:, k].numpy(), tau) for k in range(3)]
    gammas[1] = None  # one meta-label without pacing
    out = supcon_loss(z1, z2, labels, temperature=tau, gamma=gammas, label_weights=lambdas)
    singles = [supcon_loss(z1, z2, labels[:, k], temperature=tau, gamma=gammas[k]).loss for k in range(3)]
    refs = [np_supcon(z1.numpy(), z2.numpy(), labels[:, k].numpy(), tau, gamma=gammas[k])[0] for k in range(3)]
    torch.testing.assert_close(out.per_label_loss, torch.stack(singles))
    torch.testing.assert_close(out.per_label_loss, torch.tensor(refs, dtype=torch.float64))
    torch.testing.assert_close(out.loss, sum(lam * s for lam, s in zip(lambdas, singles)))
    assert out.weights.shape == (3, 10, 10)
    # the slow per-label loop used by benchmarks gives the same values
    loop_loss, loop_per_label = per_label_loop_supcon(z1, z2, labels, temperature=tau, gamma=gammas,
                                                      label_weights=lambdas)
    torch.testing.assert_close(loop_loss, out.loss)
    torch.testing.assert_close(torch.stack(loop_per_label), out.per_label_loss)


# ------------------------------------------------------------------------------------------------------------------
# invariants
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hard", "linear"])
def test_huge_gamma_equals_plain_supcon(mode):
    z1, z2, labels = _inputs(9, n=5)
    plain = supcon_loss(z1, z2, labels, temperature=0.2).loss
    paced = supcon_loss(z1, z2, labels, temperature=0.2, gamma=1e12, weighting=mode).loss
    inf = supcon_loss(z1, z2, labels, temperature=0.2, gamma=math.inf, weighting=mode).loss
    torch.testing.assert_close(paced, plain, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inf, plain, rtol=0, atol=0)
    # hard pacing at the Proposition 2 upper bound keeps every pair
    l_max = pair_loss_bounds(5, 0.2).upper
    hard = supcon_loss(z1, z2, labels, temperature=0.2, gamma=l_max * (1 + 1e-9), weighting="hard")
    torch.testing.assert_close(hard.loss, plain)
    assert hard.frac_nonzero_weight.item() == 1.0


def test_hard_gamma_below_every_pair_loss_gives_zero_loss_and_zero_grad():
    z1, z2, labels = _inputs(10, n=4)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    tau = 0.5
    gamma = 0.5 * pair_loss_matrix(z1, z2, tau).detach().min().item()
    assert gamma > 0
    out = supcon_loss(z1, z2, labels, temperature=tau, gamma=gamma, weighting="hard")
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert out.frac_nonzero_weight.item() == 0.0 and out.mean_weight.item() == 0.0
    assert z1.grad is not None and torch.count_nonzero(z1.grad) == 0 and torch.count_nonzero(z2.grad) == 0


def test_weights_carry_no_gradient():
    """The gradient equals that of sum w_const * l with the weights frozen as constants (Eq. 5); it would differ if
    gradients flowed through w = 1 - l/gamma."""
    z1, z2, labels = _inputs(11, n=4)
    tau = 0.3
    gamma = _median_pair_loss(z1, z2, labels[:, 0].numpy(), tau)
    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    out = supcon_loss(a1, a2, labels, temperature=tau, gamma=gamma)
    assert not out.weights.requires_grad and not out.mean_weight.requires_grad
    out.loss.backward()

    w_const = out.weights[0].clone()
    b1, b2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    pl = pair_loss_matrix(b1, b2, tau)
    pos = w_const > 0
    per_anchor = torch.where(pos, w_const * pl, torch.zeros_like(pl)).sum(1) / _num_pos(labels[:, 0], 4)
    manual = per_anchor.mean()
    manual.backward()
    torch.testing.assert_close(manual, out.loss)
    torch.testing.assert_close(a1.grad, b1.grad)
    torch.testing.assert_close(a2.grad, b2.grad)

    w_direct = self_paced_weights(pl, gamma, "linear")
    assert not w_direct.requires_grad


def _num_pos(y, n):
    y2 = torch.cat([y, y])
    return ((y2[:, None] == y2[None, :]).sum(1) - 1).to(torch.float64)


def test_permutation_and_view_swap_invariance():
    z1, z2, labels = _inputs(12, n=5, m=2)
    kw = dict(temperature=0.2, gamma=[3.0, 2.0], label_weights=[1.0, 0.5])
    base = supcon_loss(z1, z2, labels, **kw)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    permuted = supcon_loss(z1[perm], z2[perm], labels[perm], **kw)
    swapped = supcon_loss(z2, z1, labels, **kw)
    relabeled = supcon_loss(z1, z2, labels * 7 + 3, **kw)  # only label equality matters
    for other in (permuted, swapped, relabeled):
        torch.testing.assert_close(other.loss, base.loss)
        torch.testing.assert_close(other.per_label_loss, base.per_label_loss)


def test_simclr_equals_supcon_with_distinct_labels():
    z1, z2, _ = _inputs(13, n=5)
    distinct = torch.tensor([4, 0, 9, 2, 7])
    for gamma in (None, 2.0):
        a = supcon_loss(z1, z2, None, temperature=0.1, gamma=gamma)
        b = supcon_loss(z1, z2, distinct, temperature=0.1, gamma=gamma)
        torch.testing.assert_close(a.loss, b.loss)
        assert a.num_positive_pairs.item() == 10  # exactly one positive (the other view) per anchor
    ref = np_supcon(z1.numpy(), z2.numpy(), None, 0.1)[0]
    assert math.isclose(supcon_loss(z1, z2, temperature=0.1).loss.item(), ref, rel_tol=1e-10)


def test_single_sample_is_zero_and_finite():
    z1, z2, _ = _inputs(14, n=1)
    out = supcon_loss(z1, z2)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_flows_and_loss_decreases():
    z1, z2, labels = _inputs(15, n=5, dtype=torch.float32)
    p1, p2 = torch.nn.Parameter(z1.clone()), torch.nn.Parameter(z2.clone())
    loss_fn = SelfPacedSupConLoss(temperature=0.5, weighting="linear")
    opt = torch.optim.SGD([p1, p2], lr=0.5)
    first = None
    for _ in range(10):
        opt.zero_grad()
        loss = loss_fn(p1, p2, labels, gamma=20.0).loss
        loss.backward()
        if first is None:
            first = loss.item()
            assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
        opt.step()
    assert loss.item() < first


def test_bfloat16_under_autocast_computes_in_float32():
    z1, z2, labels = _inputs(16, n=4, dtype=torch.float32)
    h1, h2 = z1.to(torch.bfloat16).requires_grad_(True), z2.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = supcon_loss(h1, h2, labels, gamma=5.0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    expected = supcon_loss(h1.detach().float(), h2.detach().float(), labels, gamma=5.0).loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert h1.grad.dtype == torch.bfloat16 and torch.isfinite(h1.grad.float()).all()


def test_normalize_false_requires_unit_norm():
    z1, z2, labels = _inputs(17, n=4)
    u1, u2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    torch.testing.assert_close(supcon_loss(u1, u2, labels, normalize=False).loss, supcon_loss(z1, z2, labels).loss)
    with pytest.raises(ValueError, match="not L2-normalised"):
        supcon_loss(z1 * 3, z2, labels, normalize=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_fp16_autocast():
    z1, z2, labels = _inputs(18, n=6, m=2, dtype=torch.float32)
    cpu = supcon_loss(z1, z2, labels, gamma=[4.0, None], label_weights=[1.0, 0.3])
    c1, c2 = z1.cuda().requires_grad_(True), z2.cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.float16):
        gpu = supcon_loss(c1.half(), c2.half(), labels.cuda(), gamma=[4.0, None], label_weights=[1.0, 0.3])
        gpu_labels_on_cpu = supcon_loss(c1, c2, labels, gamma=[4.0, None], label_weights=[1.0, 0.3])
    assert gpu.loss.dtype == torch.float32 and gpu.loss.device.type == "cuda"
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gpu_labels_on_cpu.loss.cpu(), cpu.loss, rtol=1e-4, atol=1e-4)
    gpu.loss.backward()
    assert c1.grad is not None and torch.isfinite(c1.grad).all() and c1.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------------
# argument validation
# ------------------------------------------------------------------------------------------------------------------
_Z = torch.randn(3, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(z1=torch.randn(3, 4), z2=torch.randn(4, 4)), "same shape"),
    (dict(z1=torch.randn(3, 4), z2=torch.randn(3, 5)), "same shape"),
    (dict(z1=torch.randn(3), z2=torch.randn(3)), r"shape \(N, D\)"),
    (dict(z1=torch.randn(0, 4), z2=torch.randn(0, 4)), "N >= 1"),
    (dict(z1=torch.ones(3, 4, dtype=torch.int64), z2=torch.ones(3, 4, dtype=torch.int64)), "floating-point"),
    (dict(z1=torch.tensor([[float("nan")] * 4] * 3), z2=_Z), "non-finite"),
    (dict(z1=torch.full((3, 4), float("inf")), z2=_Z), "non-finite"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=-1.0), "gamma"),
    (dict(gamma=float("nan")), "gamma"),
    (dict(gamma=[1.0, 2.0]), "gamma"),
    (dict(weighting="exp"), "weighting"),
    (dict(labels=torch.tensor([0, 1])), "length mismatch"),
    (dict(labels=torch.tensor([0.0, 1.0, 0.0])), "integers"),
    (dict(labels=torch.zeros(3, 1, 1, dtype=torch.int64)), r"shape \(N,\) or \(N, M\)"),
    (dict(labels=torch.zeros(3, 0, dtype=torch.int64)), "M >= 1"),
    (dict(label_weights=[1.0, 2.0]), "label_weights"),
    (dict(label_weights=[-1.0]), "label_weights"),
])
def test_value_errors(kwargs, match):
    args = dict(z1=_Z, z2=_Z.flip(0), labels=torch.tensor([0, 1, 0]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        supcon_loss(args.pop("z1"), args.pop("z2"), args.pop("labels"), **args)


def test_value_errors_module_and_weights():
    with pytest.raises(ValueError, match="temperature"):
        SelfPacedSupConLoss(temperature=0)
    with pytest.raises(ValueError, match="weighting"):
        SelfPacedSupConLoss(weighting="quadratic")
    with pytest.raises(ValueError, match="weighting"):
        self_paced_weights(torch.ones(2), 1.0, "quadratic")
    with pytest.raises(ValueError, match="gamma"):
        self_paced_weights(torch.ones(2), torch.tensor([0.0, 1.0]), "hard")
