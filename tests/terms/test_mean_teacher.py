"""MeanTeacherTerm: the paper's softmax-MSE, and the class-balanced reduction against a NumPy reference."""
import numpy as np
import pytest
import torch
from conftest import np_softmax, tiny_unet

from nnunet_contrastive.framework.context import StepContext
from nnunet_contrastive.terms import MeanTeacherTerm
from nnunet_contrastive.terms.pseudo_label import class_balanced_mean, pixel_mean


def _ctx(labeled=(True, True, False, False)):
    g = torch.Generator().manual_seed(5)
    batch = {"data": torch.randn(4, 1, 8, 8, generator=g), "data_view2": torch.randn(4, 1, 8, 8, generator=g),
             "labeled": torch.tensor(labeled), "target": [torch.zeros(4, 1, 8, 8)]}
    return StepContext(batch, torch.device("cpu"), tiny_unet(0), teacher=tiny_unet(1))


def _per_class_errors(ctx):
    """{teacher class: [per-pixel mean squared softmax difference]} on the unlabeled rows, by explicit loops."""
    s = np_softmax(ctx.forward("student", 0, "unlabeled").logits.detach().double().numpy())
    t = np_softmax(ctx.forward("teacher", 1, "unlabeled").logits.detach().double().numpy())
    out = {}
    for n in range(s.shape[0]):
        for y in range(s.shape[2]):
            for x in range(s.shape[3]):
                c = int(np.argmax(t[n, :, y, x]))
                out.setdefault(c, []).append(float(np.mean((s[n, :, y, x] - t[n, :, y, x]) ** 2)))
    return out


def test_default_is_the_mean_over_pixels_and_classes():
    ctx = _ctx()
    loss, _ = MeanTeacherTerm()(ctx, "unlabeled")
    errors = [e for v in _per_class_errors(ctx).values() for e in v]
    assert len(errors) == 2 * 8 * 8
    assert float(loss.detach()) == pytest.approx(np.mean(errors), rel=1e-5)
    assert float(MeanTeacherTerm(pixel_mean)(ctx, "unlabeled")[0].detach()) == pytest.approx(np.mean(errors),
                                                                                              rel=1e-5)


def test_class_balanced_matches_numpy_reference_and_differs_from_the_mean():
    ctx = _ctx()
    loss, _ = MeanTeacherTerm(class_balanced_mean)(ctx, "unlabeled")
    per_class = _per_class_errors(ctx)
    assert len(per_class) >= 2  # the reference below would equal the plain mean with one class
    ref = np.mean([np.mean(v) for v in per_class.values()])
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    assert ref != pytest.approx(np.mean([e for v in per_class.values() for e in v]), rel=1e-3)
    loss.backward()
    student_grads = [p.grad for p in ctx.student.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    assert all(p.grad is None for p in ctx.teacher.parameters())


def test_no_unlabeled_rows_adds_nothing():
    ctx = _ctx(labeled=(True,) * 4)
    assert MeanTeacherTerm(class_balanced_mean)(ctx, "unlabeled") is None


# ---------------------------------------------------------------------------------------------------- CutMix
def _cutmix_reference(ctx, seed):
    """Student on the pasted view-1 rows and the teacher's pasted view-2 logits, built here from the networks and
    the boxes drawn with the same seed; returns NumPy softmaxes (student, teacher) of the unlabeled rows."""
    from nnunet_contrastive.components.cutmix import box_masks
    idx = ctx.rows("unlabeled")
    x, x2 = ctx.batch["data"][idx], ctx.batch["data_view2"][idx]
    torch.manual_seed(seed)
    m = box_masks(len(idx), x.shape[2:]).numpy()
    xn = x.numpy()
    pasted = np.stack([np.where(m[i], xn[(i + 1) % len(idx)], xn[i]) for i in range(len(idx))])
    with torch.no_grad():
        s = ctx.student(torch.from_numpy(pasted))
        t = ctx.teacher(x2)
    s = (s[0] if isinstance(s, (list, tuple)) else s).double().numpy()
    t = (t[0] if isinstance(t, (list, tuple)) else t).double().numpy()
    t = np.stack([np.where(m[i], t[(i + 1) % len(idx)], t[i]) for i in range(len(idx))])
    return np_softmax(s), np_softmax(t)


def test_cutmix_softmax_mse_matches_numpy_reference():
    from nnunet_contrastive.terms import CutMixConsistencyTerm
    ctx = _ctx(labeled=(True, False, False, False))
    torch.manual_seed(11)
    loss, _ = CutMixConsistencyTerm()(ctx, "unlabeled")
    s, t = _cutmix_reference(ctx, 11)
    assert float(loss.detach()) == pytest.approx(np.mean((s - t) ** 2), rel=1e-5)
    # it is not the plain Mean Teacher's loss on the unpasted rows
    plain = float(MeanTeacherTerm()(ctx, "unlabeled")[0].detach())
    assert float(loss.detach()) != pytest.approx(plain, rel=1e-3)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())


def test_cutmix_confident_cross_entropy_matches_numpy_reference():
    from nnunet_contrastive.terms import CutMixConsistencyTerm
    from nnunet_contrastive.terms.mean_teacher import confident_cross_entropy
    ctx = _ctx(labeled=(True, False, False, False))
    s, t = _cutmix_reference(ctx, 12)
    threshold = float(np.quantile(t.max(axis=1), 0.5))  # about half of the pixels are confident enough
    torch.manual_seed(12)
    loss, _ = CutMixConsistencyTerm(loss=confident_cross_entropy(threshold))(ctx, "unlabeled")
    hard, conf = t.argmax(axis=1), t.max(axis=1)
    ce = -np.log(np.take_along_axis(s, hard[:, None], axis=1)[:, 0])
    kept = conf >= threshold
    assert 0 < kept.sum() < kept.size
    assert float(loss.detach()) == pytest.approx(ce[kept].mean(), rel=1e-4)
    # nothing confident: 0 with a zero gradient, the step goes on
    torch.manual_seed(12)
    none, _ = CutMixConsistencyTerm(loss=confident_cross_entropy(0.999999))(ctx, "unlabeled")
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_cutmix_needs_two_rows_and_a_valid_setup():
    from nnunet_contrastive.terms import CutMixConsistencyTerm
    from nnunet_contrastive.terms.mean_teacher import confident_cross_entropy
    assert CutMixConsistencyTerm()(_ctx(labeled=(True, True, True, False)), "unlabeled") is None
    with pytest.raises(ValueError, match="area"):
        CutMixConsistencyTerm(area=1.5)
    with pytest.raises(ValueError, match="min_confidence"):
        confident_cross_entropy(1.0)
