"""ARCO pixel contrast (nnunet_contrastive.losses.arco, terms.arco, components.arco_head) against independent NumPy
references on tiny inputs; gradient paths; the key memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_contrastive.components.arco_head import MultiScaleDenseHead
from nnunet_contrastive.components.samplers import NSSampler, SAGSampler, SGSampler
from nnunet_contrastive.components.teacher import EMATeacher
from nnunet_contrastive.losses.arco import (ClassKeyMemory, arco_contrast, arco_valid_mask, class_means,
                                            entropy_percent_at)
from nnunet_contrastive.terms.arco import ARCOContrastTerm, ARCOPseudoLabelTerm


# ---------------------------------------------------------------------------------------------- references
def np_arco(anchors, anchor_mask, means, mean_ok, keys, key_class, tau):
    """Loop-by-loop reference: per class, per anchor, -log softmax of the positive among [mean_c, other keys]."""
    def unit(v):
        return v / max(np.linalg.norm(v), 1e-12)

    per_class, used = [], []
    K = anchors.shape[0]
    for c in range(K):
        negs = [unit(k) for k, kc in zip(keys, key_class) if kc >= 0 and kc != c]
        losses = []
        if mean_ok[c] and negs:
            for a, m in zip(anchors[c], anchor_mask[c]):
                if not m:
                    continue
                a = unit(a)
                logits = np.array([a @ unit(means[c])] + [a @ k for k in negs]) / tau
                mx = logits.max()
                losses.append(-(logits[0] - (mx + np.log(np.exp(logits - mx).sum()))))
        used.append(bool(losses))
        per_class.append(np.mean(losses) if losses else 0.0)
    loss = np.mean([p for p, u in zip(per_class, used) if u]) if any(used) else 0.0
    return loss, np.array(per_class), np.array(used)


def _case(seed, K=3, n=4, D=5, N=7):
    rng = np.random.default_rng(seed)
    anchors = rng.normal(size=(K, n, D))
    mask = rng.random((K, n)) < 0.7
    means = rng.normal(size=(K, D))
    mean_ok = np.array([True] * (K - 1) + [bool(seed % 2)])
    keys = rng.normal(size=(N, D))
    key_class = rng.integers(-1, K, size=N)
    return anchors, mask, means, mean_ok, keys, key_class


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_arco_contrast_matches_numpy_reference(seed, tau):
    anchors, mask, means, mean_ok, keys, key_class = _case(seed)
    ref_loss, ref_pc, ref_used = np_arco(anchors, mask, means, mean_ok, keys, key_class, tau)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out = arco_contrast(t(anchors), torch.tensor(mask), t(means), torch.tensor(mean_ok), t(keys),
                        torch.tensor(key_class), tau)
    assert out.used.numpy().tolist() == ref_used.tolist()
    np.testing.assert_allclose(out.per_class.numpy(), ref_pc, rtol=1e-10, atol=1e-12)
    assert float(out.loss) == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)


def test_arco_contrast_edge_cases():
    # a single class: no negatives anywhere -> loss 0, no class used, still differentiable
    a = torch.randn(1, 3, 4, requires_grad=True)
    out = arco_contrast(a, torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 4), torch.ones(1, dtype=torch.bool),
                        torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    assert float(out.loss.detach()) == 0.0 and not out.used.any()
    out.loss.backward()
    # anchors identical to their mean, negatives opposite: loss ~ log(1 + n e^{-2/tau}) -> small
    mu = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    anchors = mu.unsqueeze(1).repeat(1, 2, 1)
    out = arco_contrast(anchors, torch.ones(2, 2, dtype=torch.bool), mu, torch.ones(2, dtype=torch.bool), mu,
                        torch.tensor([0, 1]), temperature=0.5)
    assert float(out.loss) == pytest.approx(np.log1p(np.exp(-4.0)), rel=1e-5)


# ---------------------------------------------------------------------------------------------- masks, means
def test_valid_mask_matches_numpy():
    rng = np.random.default_rng(0)
    B, K, H, W = 4, 3, 5, 6
    labeled = np.array([True, False, True, False])
    t_prob = rng.dirichlet(np.ones(K), size=(B, H, W)).transpose(0, 3, 1, 2)
    s_prob = rng.dirichlet(np.ones(K), size=(B, H, W)).transpose(0, 3, 1, 2)
    gt = rng.integers(0, K, size=(B, H, W))
    gt[0, 0, 0] = -1  # ignore
    labels = np.where(labeled[:, None, None], gt, t_prob.argmax(1))
    pct = 30.0
    ent = -(s_prob * np.log(s_prob + 1e-10)).sum(1)
    thr = np.percentile(ent[~labeled], pct)
    ref = np.zeros((B, K, H, W), bool)
    for b in range(B):
        for c in range(K):
            ref[b, c] = (labels[b] == c) & (t_prob[b, c] > 0.3) & (labeled[b] | (ent[b] <= thr))
    valid, stats = arco_valid_mask(torch.tensor(labels), torch.tensor(labeled), torch.tensor(t_prob),
                                   torch.tensor(s_prob), pct, 0.3)
    assert torch.equal(valid, torch.tensor(ref))
    assert float(stats["entropy_threshold"]) == pytest.approx(thr, rel=1e-6)
    assert ref[~labeled].any() and not ref[~labeled].all()  # the test exercises the entropy cut


def test_entropy_schedule_and_class_means():
    assert entropy_percent_at(0.0) == 20.0 and entropy_percent_at(0.5) == 10.0 and entropy_percent_at(1.0) == 0.0
    rng = np.random.default_rng(1)
    f = rng.normal(size=(2, 4, 3, 3))
    v = rng.random((2, 3, 3, 3)) < 0.4
    v[:, 2] = False
    means, counts = class_means(torch.tensor(f), torch.tensor(v))
    for c in range(2):
        pix = [f[b, :, i, j] for b in range(2) for i in range(3) for j in range(3) if v[b, c, i, j]]
        np.testing.assert_allclose(means[c].numpy(), np.mean(pix, 0), rtol=1e-6)
        assert int(counts[c]) == len(pix)
    assert int(counts[2]) == 0 and torch.all(means[2] == 0)


# ---------------------------------------------------------------------------------------------- head
@pytest.mark.parametrize("dims", [2, 3])
def test_head_at_points_equals_full_map_gathered(dims):
    torch.manual_seed(0)
    size = (6, 10) if dims == 2 else (4, 6, 5)
    maps = [torch.randn(2, 8, *[max(1, s // 4) for s in size]), torch.randn(2, 4, *[s // 2 for s in size]),
            torch.randn(2, 3, *size)]
    head = MultiScaleDenseHead([8, 4, 3], dims, hidden=7, out_dim=5).double()
    maps = [m.double() for m in maps]
    full = head(maps, size)  # (B, D, *size)
    L = int(np.prod(size))
    idx = torch.randperm(2 * L)[:15]
    ref = full.flatten(2).permute(0, 2, 1).reshape(2 * L, -1)[idx]
    torch.testing.assert_close(head.at(maps, size, idx), ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- memory
def test_key_memory_fifo():
    mem = ClassKeyMemory(2, 3, size=4)
    keys, cls = mem.contents()
    assert keys.shape == (0, 3)
    k = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)
    mem.push(k, torch.tensor([[True, True, True], [True, False, False]]))
    mem.push(k + 100, torch.tensor([[True, True, False], [False, False, False]]))
    keys, cls = mem.contents()
    assert cls.tolist() == [0, 0, 0, 0, 1]
    # class 0 held 3 then got 2 more: the oldest one (row 0) was overwritten
    got = {tuple(r) for r in keys[cls == 0].tolist()}
    assert got == {tuple(x) for x in [k[0, 1].tolist(), k[0, 2].tolist(), (k[0, 0] + 100).tolist(),
                                      (k[0, 1] + 100).tolist()]}
    assert keys[cls == 1].tolist() == [k[1, 0].tolist()]
    assert "keys" in mem.state_dict() and "filled" in mem.state_dict()


# ---------------------------------------------------------------------------------------------- term on a U-Net
def _tiny_unet():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv2d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1),
                         conv_bias=True, norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)


class _FakeTrainer:
    def __init__(self, heads):
        self.heads = heads

    def teacher_head(self, term, head):
        return self.heads[head]


def _batch(B=4, n_lab=2, H=16, W=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1, H, W, generator=g)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    seg = ((yy > 4).long() + (xx > 9).long()).view(1, 1, H, W).repeat(B, 1, 1, 1)
    seg[n_lab:] = -1
    labeled = torch.arange(B) < n_lab
    return {"data": x, "data_view2": x + 0.05 * torch.randn(x.shape, generator=g), "target": [seg.short()],
            "labeled": labeled}


@pytest.mark.parametrize("sampler", [NSSampler(), SGSampler(), SAGSampler()])
def test_term_gradient_reaches_student_and_head_never_teacher(sampler):
    from nnunet_contrastive.framework.context import StepContext

    net = _tiny_unet()
    head = MultiScaleDenseHead.for_network(net, hidden=8, out_dim=6)
    term = ARCOContrastTerm(head, 3, sampler, n_anchors=16, n_keys=8, memory_size=32,
                            entropy_percent=(60.0, 60.0))
    term.name = "arco"
    teacher = EMATeacher(net, decay=0.99)
    head_t = EMATeacher(head, decay=0.99)
    ctx = StepContext(_batch(), torch.device("cpu"), net, teacher.module, None, 0.0, None,
                      _FakeTrainer({"head": head_t}))
    loss, stats = term(ctx, "all")
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert int(stats["arco_classes_used"]) >= 2
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    assert term.predictor.weight.grad is not None and term.predictor.weight.grad.abs().sum() > 0
    enc_grads = [p.grad for p in net.encoder.parameters() if p.grad is not None]
    assert enc_grads and sum(float(g.abs().sum()) for g in enc_grads) > 0
    assert all(p.grad is None for p in teacher.module.parameters())
    assert all(p.grad is None for p in head_t.module.parameters())
    # the memory is not always empty: this batch's keys are there now, a second step sees them as negatives
    keys, cls = term.memory.contents()
    assert keys.shape[0] > 0 and len(set(cls.tolist())) >= 2
    assert torch.all(keys.abs().sum(1) > 0)


def test_term_only_anchor_valid_pixels_are_sampled(monkeypatch):
    """Anchors come only from pixels that are valid for their class (checked through the sampler's input)."""
    from nnunet_contrastive.framework.context import StepContext

    net = _tiny_unet()
    head = MultiScaleDenseHead.for_network(net, hidden=8, out_dim=6)
    seen = []

    class Spy(SGSampler):
        def sample(self, valid, n, generator=None, pool_batch=False):
            s = super().sample(valid, n, generator, pool_batch)
            seen.append((valid.clone(), s))
            return s

    term = ARCOContrastTerm(head, 3, Spy(), n_anchors=16, n_keys=8, memory_size=0)
    term.name = "arco"
    batch = _batch()
    ctx = StepContext(batch, torch.device("cpu"), net, EMATeacher(net).module, None, 0.0, None,
                      _FakeTrainer({"head": EMATeacher(head)}))
    term(ctx, "all")
    valid, s = seen[-1]
    gt = batch["target"][0][:2, 0].long()
    for c in range(3):
        assert not (valid[:2, c] & (gt != c)).any()  # labeled rows: ground truth only
        idx = s.index[0, c][s.mask[0, c]]
        assert valid[:, c].reshape(-1)[idx].all()


def test_term_sampler_draws_resume_exactly_from_the_state_dict():
    """The sampler's generator is the term's own (not torch's global RNG) and lives in its state_dict: a term
    restored from a checkpoint draws the same anchors as the uninterrupted one, whatever the global RNG did since."""
    import copy

    from nnunet_contrastive.framework.context import StepContext

    net = _tiny_unet()
    head = MultiScaleDenseHead.for_network(net, hidden=8, out_dim=6)
    draws = {}

    class Spy(SGSampler):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def sample(self, valid, n, generator=None, pool_batch=False):
            s = super().sample(valid, n, generator, pool_batch)
            draws.setdefault(self.name, []).append(s.index.clone())
            return s

    def make(name):
        t = ARCOContrastTerm(copy.deepcopy(head), 3, Spy(name), n_anchors=16, n_keys=8, memory_size=0,
                             entropy_percent=(60.0, 60.0))
        t.name = "arco"
        return t

    def step(term):
        ctx = StepContext(_batch(), torch.device("cpu"), net, EMATeacher(net).module, None, 0.0, None,
                          _FakeTrainer({"head": EMATeacher(term.head)}))
        with torch.no_grad():
            term(ctx, "all")

    torch.manual_seed(1)
    a = make("a")
    step(a)
    saved = copy.deepcopy(a.state_dict())
    assert "_extra_state" in saved
    step(a)  # the uninterrupted run's second step
    b = make("b")  # "--c": a new process, another global RNG state
    torch.manual_seed(999)
    b.load_state_dict(saved)
    step(b)
    assert torch.equal(draws["a"][-1], draws["b"][-1]) and torch.equal(draws["a"][-2], draws["b"][-2])
    assert not torch.equal(draws["a"][0], draws["a"][2])  # successive steps draw different pixels
    torch.manual_seed(1)  # seeded runs repeat their draws
    c = make("c")
    step(c)
    assert torch.equal(draws["c"][0], draws["a"][0])


def test_pseudo_label_term_weights_rows_by_confident_fraction():
    from nnunet_contrastive.framework.context import StepContext

    net = _tiny_unet()
    teacher = EMATeacher(net)
    with torch.no_grad():  # make the teacher differ from the student
        for p in teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ctx = StepContext(_batch(), torch.device("cpu"), net, teacher.module, None, 0.0, None, None)
    s = ctx.forward("student", 0, "unlabeled").logits.detach().double().numpy()
    t = ctx.forward("teacher", 1, "unlabeled").logits.double().numpy()
    pt = np.exp(t - t.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    thr = float(np.median(pt.max(1)))
    w = (pt.max(1) >= thr).reshape(pt.shape[0], -1).mean(1)
    assert 0 < w.mean() < 1
    logp = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    pl = t.argmax(1)
    ce = -np.take_along_axis(logp, pl[:, None], 1)[:, 0]
    ref = (w[:, None, None] * ce).mean()
    loss, stats = ARCOPseudoLabelTerm(threshold=thr)(ctx, "unlabeled")
    assert float(loss) == pytest.approx(ref, rel=1e-4)
    assert float(list(stats.values())[0]) == pytest.approx(w.mean(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.module.parameters())
    assert ARCOPseudoLabelTerm()(ctx, "labeled") is not None  # labeled rows exist; "unlabeled" none -> None below
    empty = StepContext({**_batch(), "labeled": torch.ones(4, dtype=torch.bool)}, torch.device("cpu"), net,
                        teacher.module, None, 0.0, None, None)
    assert ARCOPseudoLabelTerm()(empty, "unlabeled") is None


def test_checkpoints_without_the_sampler_state_still_load_other_gaps_fail():
    """A loss-term state written before ARCO's sampler generator existed (no `_extra_state`) loads, with a fresh
    generator; a missing weight or an unknown key is still an error naming it."""
    from nnunet_contrastive.trainers.staged import load_terms_state

    def terms():
        head = MultiScaleDenseHead.for_network(_tiny_unet(), hidden=8, out_dim=6)
        return torch.nn.ModuleDict({"arco": ARCOContrastTerm(head, 3, SGSampler(), n_anchors=4, n_keys=4)})

    a = terms()
    a["arco"].sampler_generator(torch.device("cpu"))
    full = a.state_dict()
    old = {k: v for k, v in full.items() if not k.endswith("_extra_state")}
    b = terms()
    load_terms_state(b, old, "T")
    assert torch.equal(b["arco"].predictor.weight, a["arco"].predictor.weight)
    load_terms_state(b, full, "T")  # with the state: the same generator state as a's
    assert torch.equal(b["arco"].sampler_generator(torch.device("cpu")).get_state(),
                       a["arco"].sampler_generator(torch.device("cpu")).get_state())
    weight = next(k for k in old if k.endswith("predictor.weight"))
    with pytest.raises(RuntimeError, match="predictor.weight"):
        load_terms_state(terms(), {k: v for k, v in old.items() if k != weight}, "T")
    with pytest.raises(RuntimeError, match="unexpected.*bogus"):
        load_terms_state(terms(), {**old, "arco.bogus": torch.zeros(1)}, "T")


def test_class_means_stay_finite_and_exact_under_float16_autocast():
    """On an H200 at nnU-Net's ACDC plans (batch 56 x 256 x 224) the ARCO loss was NaN from the first step: under
    CUDA AMP the einsum of class_means ran in float16 and its sums over the batch's pixels overflowed to inf. CPU
    autocast with float16 reproduces it; the means must match a float64 NumPy reference."""
    gen = torch.Generator().manual_seed(0)
    feats = 6.0 + torch.rand(4, 5, 64, 80, generator=gen)  # class 0: ~18 400 pixels x 6.5 > 65 504
    valid = torch.rand(4, 3, 64, 80, generator=gen) < torch.tensor([0.9, 0.5, 0.0]).view(1, 3, 1, 1)
    f, v = feats.double().numpy(), valid.numpy()
    ref = np.stack([np.stack([f[:, d][v[:, k]].mean() if v[:, k].any() else 0.0 for d in range(5)])
                    for k in range(3)])
    with torch.autocast("cpu", dtype=torch.float16):
        means, counts = class_means(feats.half(), valid)
    assert torch.isfinite(means).all()
    np.testing.assert_allclose(means.double().numpy(), ref, rtol=2e-3, atol=1e-3)  # float16 inputs: 3 digits
    assert counts.tolist() == [float(v[:, k].sum()) for k in range(3)]
