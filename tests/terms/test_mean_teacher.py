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
