"""Tests for nnunet_contrastive.components.teacher: EMA teacher, MT consistency loss, ramp-up, flips."""
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import np_softmax

from nnunet_contrastive.components.teacher import (EMATeacher, ema_decay, flip_batch, mean_teacher_consistency,
                                                   softmax_squared_error,
                                        random_flip, sigmoid_rampup)


def _np(t):
    return t.detach().cpu().double().numpy()


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_decay_warmup_values():
    assert [ema_decay(t, 0.999) for t in range(4)] == pytest.approx([0.0, 0.5, 2 / 3, 0.75])
    assert ema_decay(10 ** 6, 0.999) == pytest.approx(0.999)
    assert ema_decay(5, 0.7) == pytest.approx(0.7)
    assert ema_decay(0, 0.9, warmup=False) == pytest.approx(0.9)
    assert ema_decay(np.int64(1), 0.9) == pytest.approx(0.5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            ema_decay(bad)
    with pytest.raises(ValueError):
        ema_decay(0, decay=1.5)


@pytest.mark.parametrize("decay,warmup", [(0.7, True), (0.999, True), (0.6, False)])
def test_ema_update_matches_hand_formula(decay, warmup):
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    teacher = EMATeacher(student, decay=decay, warmup=warmup)
    ref = {k: _np(v) for k, v in student.state_dict().items()}  # teacher starts as a copy
    expected_alphas = [min(1 - 1 / (t + 1), decay) if warmup else decay for t in range(5)]
    for t in range(5):
        with torch.no_grad():  # simulate an optimiser step
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        alpha = teacher.update(student)
        assert alpha == pytest.approx(expected_alphas[t])
        for k, v in student.state_dict().items():
            ref[k] = expected_alphas[t] * ref[k] + (1 - expected_alphas[t]) * _np(v)
        for k, v in teacher.module.state_dict().items():
            np.testing.assert_allclose(_np(v), ref[k], rtol=1e-6, atol=1e-6)
    assert teacher.num_updates == 5
    if warmup:  # alpha_0 = 0: after the first update the teacher was an exact copy, later it lags behind
        assert not torch.allclose(teacher.module.weight, student.weight)


def test_explicit_step_and_weight_decay():
    torch.manual_seed(0)
    student = nn.Linear(2, 2)
    teacher = EMATeacher(student, decay=0.99, weight_decay=0.1)
    t0 = _np(teacher.module.weight)
    with torch.no_grad():
        student.weight.add_(1.0)
    alpha = teacher.update(student, step=3)  # alpha_3 = 0.75
    assert alpha == pytest.approx(0.75) and teacher.num_updates == 4
    expected = (0.75 * t0 + 0.25 * _np(student.weight)) * 0.9
    np.testing.assert_allclose(_np(teacher.module.weight), expected, rtol=1e-6)


def test_teacher_has_no_grad_and_is_independent():
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    student(torch.randn(2, 4)).sum().backward()  # the student has .grad tensors when the copy is made
    teacher = EMATeacher(student)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    x = torch.randn(2, 4, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad
    with torch.no_grad():
        student.weight.mul_(2)
    assert not torch.allclose(teacher.module.weight, student.weight)  # a real copy
    teacher.update(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_buffers_copied_and_eval_mode_kept():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = EMATeacher(student, decay=0.9)
    teacher.train()
    assert teacher.training and not teacher.module.training and not teacher.module[1].training
    student.train()
    for _ in range(3):
        student(torch.randn(8, 3) * 5 + 2)
    teacher.update(student)
    teacher.update(student)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(teacher.module[1], name), getattr(student[1], name))
    free = EMATeacher(student, eval_mode=False)
    free.train()
    assert free.module.training
    free.eval()
    assert not free.module.training


def test_sync_from_copies_exactly():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = EMATeacher(student)
    teacher.update(student)
    teacher.update(student)
    with torch.no_grad():  # e.g. nnU-Net's -pretrained_weights loaded into the student after initialize()
        for p in student.parameters():
            p.copy_(torch.randn_like(p))
        student[1].running_mean.fill_(3.0)
    teacher.sync_from(student)
    for (k, v), (k2, v2) in zip(teacher.module.state_dict().items(), student.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert teacher.num_updates == 2
    teacher.sync_from(student, reset_counter=True)
    assert teacher.num_updates == 0
    assert all(not p.requires_grad for p in teacher.parameters())


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    teacher = EMATeacher(student, decay=0.95)
    for _ in range(3):
        with torch.no_grad():
            student.weight.add_(torch.randn_like(student.weight))
        teacher.update(student)
    buf = io.BytesIO()
    torch.save({"teacher": teacher.state_dict(), "student": student.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    student2 = nn.Linear(3, 2)  # fresh run, different init
    student2.load_state_dict(ckpt["student"])
    resumed = EMATeacher(student2, decay=0.95)
    assert resumed.num_updates == 0
    resumed.load_state_dict(ckpt["teacher"])
    assert resumed.num_updates == 3
    assert not any(p.requires_grad for p in resumed.parameters())
    for _ in range(2):
        step = torch.randn_like(student.weight)
        with torch.no_grad():
            student.weight.add_(step)
            student2.weight.add_(step)
        assert teacher.update(student) == resumed.update(student2)
    for a, b in zip(teacher.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.num_updates == teacher.num_updates == 5


def test_wrapped_student_dtype_move_and_mismatch():
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    compiled = torch.compile(student)  # lazily compiled; never called here
    teacher = EMATeacher(compiled)
    assert list(teacher.module.state_dict()) == list(student.state_dict())
    teacher.update(compiled)
    teacher.sync_from(nn.DataParallel(compiled))
    teacher = teacher.to(torch.float64)
    assert teacher.module.weight.dtype == torch.float64
    teacher.update(student)  # float32 student into a float64 teacher
    assert teacher.module.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="different"):
        teacher.update(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="shape"):
        teacher.update(nn.Linear(4, 2))
    with pytest.raises(ValueError):
        EMATeacher(student, decay=1.5)
    with pytest.raises(ValueError):
        teacher.load_state_dict({**teacher.state_dict(), "_extra_state": {}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_move():
    student = nn.Linear(3, 2).cuda()
    teacher = EMATeacher(student).cpu()
    teacher.update(student)
    teacher.cuda()
    assert teacher.module.weight.is_cuda
    teacher.update(student)


# ---------------------------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 4, 3, 2, 3)])
def test_consistency_matches_numpy_and_gradients(shape):
    torch.manual_seed(0)
    s = (torch.randn(shape) * 3).requires_grad_(True)
    t = (torch.randn(shape) * 3).requires_grad_(True)
    loss = mean_teacher_consistency(s, t)
    ref = np.mean((np_softmax(_np(s)) - np_softmax(_np(t))) ** 2)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    ref_sum = np.sum((np_softmax(_np(s)) - np_softmax(_np(t))) ** 2)
    assert mean_teacher_consistency(s, t, reduction="sum").item() == pytest.approx(ref_sum, rel=1e-5)
    # differs from the buggy hook version (teacher logits vs student probabilities)
    buggy = np.mean((np_softmax(_np(s)) - _np(t)) ** 2)
    assert abs(ref - buggy) > 1e-3
    loss.backward()
    assert t.grad is None  # teacher side detached
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_consistency_zero_for_identical_and_shift_invariant():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = mean_teacher_consistency(s, s.detach().clone())
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s.grad == 0)
    # softmax is invariant to adding a per-pixel constant to the logits
    assert mean_teacher_consistency(s, s.detach() + 5.0).item() == pytest.approx(0.0, abs=1e-10)


def test_consistency_deep_supervision_lists():
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    t = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    level = [np.mean((np_softmax(_np(a)) - np_softmax(_np(b))) ** 2) for a, b in zip(s, t)]
    assert mean_teacher_consistency(s, t).item() == pytest.approx(level[0], rel=1e-5)
    t_changed = [t[0], torch.randn(2, 3, 4, 4), t[2]]  # only level 0 counts by default
    assert mean_teacher_consistency(s, t_changed).item() == pytest.approx(level[0], rel=1e-5)
    w = [4 / 7, 2 / 7, 1 / 7]
    assert mean_teacher_consistency(s, tuple(t), ds_weights=w).item() == pytest.approx(
        sum(wi * li for wi, li in zip(w, level)), rel=1e-5)
    assert mean_teacher_consistency(s, t, ds_weights=[0, 1, 0]).item() == pytest.approx(level[1], rel=1e-5)


def test_consistency_value_errors():
    a = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        mean_teacher_consistency(a, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError):
        mean_teacher_consistency(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        mean_teacher_consistency(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="both"):
        mean_teacher_consistency([a], a)
    with pytest.raises(ValueError):
        mean_teacher_consistency([a, a], [a])
    with pytest.raises(ValueError):
        mean_teacher_consistency([], [])
    with pytest.raises(ValueError):
        mean_teacher_consistency([a, a], [a, a], ds_weights=[1.0])
    with pytest.raises(ValueError):
        mean_teacher_consistency([a, a], [a, a], ds_weights=[0.0, 0.0])
    with pytest.raises(ValueError):
        mean_teacher_consistency(a, a, ds_weights=[1.0])
    with pytest.raises(ValueError):
        mean_teacher_consistency(a, a, reduction="none")


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 4, 3, 2, 3)])
def test_softmax_squared_error_per_pixel_matches_numpy(shape):
    torch.manual_seed(1)
    s = (torch.randn(shape) * 3).requires_grad_(True)
    t = (torch.randn(shape) * 3).requires_grad_(True)
    err, cls = softmax_squared_error(s, t)
    p_s, p_t = np_softmax(_np(s)), np_softmax(_np(t))
    ref = np.zeros((shape[0],) + shape[2:])
    for idx in np.ndindex(*ref.shape):  # explicit loop over pixels, channel sum by hand
        pix = (idx[0], slice(None)) + idx[1:]
        ref[idx] = sum((a - b) ** 2 for a, b in zip(p_s[pix], p_t[pix])) / shape[1]
    np.testing.assert_allclose(err.detach().numpy(), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(cls.numpy(), p_t.argmax(axis=1))
    # the plain mean of the per-pixel errors is the paper's consistency
    assert err.mean().item() == pytest.approx(mean_teacher_consistency(s, t).item(), rel=1e-6)
    err.sum().backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_softmax_squared_error_lists_and_errors():
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    t = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    err, cls = softmax_squared_error(s, t)  # the highest resolution only
    assert err.shape == cls.shape == (2, 8, 8)
    assert torch.equal(err, softmax_squared_error(s[0], t[0])[0])
    with pytest.raises(ValueError, match="both"):
        softmax_squared_error(s, t[0])
    with pytest.raises(ValueError, match="shapes differ"):
        softmax_squared_error(s[0], t[1])
    with pytest.raises(ValueError):
        softmax_squared_error([], [])
    with pytest.raises(ValueError, match="equally long"):
        softmax_squared_error(s, t[:1])


# ---------------------------------------------------------------------------------------------- ramp-up
def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(25, 10) == 1.0
    assert sigmoid_rampup(-3, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0, 0) == 1.0
    values = [sigmoid_rampup(e / 4, 10) for e in range(0, 60)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(0 < v <= 1 for v in values)
    for bad in ((1, -1), (float("nan"), 5), (1, float("inf"))):
        with pytest.raises(ValueError):
            sigmoid_rampup(*bad)


# ---------------------------------------------------------------------------------------------- flips
def test_flip_round_trip_and_reference():
    x4 = torch.randn(2, 3, 4, 5)
    x5 = torch.randn(2, 1, 3, 4, 5)
    for x in (x4, x5):
        for dims in [(), (2,), (x.dim() - 1,), tuple(range(2, x.dim()))]:
            y = flip_batch(x, dims)
            assert torch.equal(flip_batch(y, dims), x)
            ref = np.flip(x.numpy(), axis=dims).copy() if dims else x.numpy()
            np.testing.assert_array_equal(y.numpy(), ref)
    ds = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    back = flip_batch(flip_batch(ds, (3,)), (3,))
    assert isinstance(back, list) and all(torch.equal(a, b) for a, b in zip(back, ds))
    assert not torch.equal(flip_batch(x4, (3,)), x4)


def test_random_flip_deterministic_and_undoable():
    x = torch.randn(2, 3, 6, 7)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        runs.append([random_flip(x, generator=g)[1] for _ in range(20)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1  # the draws actually vary
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        y, dims = random_flip(x, generator=g)
        assert set(dims) <= {2, 3}
        assert torch.equal(flip_batch(y, dims), x)
    assert random_flip(x, p=0.0)[1] == ()
    assert random_flip(x, p=1.0)[1] == (2, 3)
    assert random_flip(x, p=1.0, dims=[3])[1] == (3,)
    # student sees a flipped input; its output flipped back is in the teacher's frame
    conv = nn.Conv2d(3, 2, 1)
    y, dims = random_flip(x, p=1.0)
    torch.testing.assert_close(flip_batch(conv(y), dims), conv(x))


def test_flip_value_errors():
    x = torch.randn(2, 3, 4, 4)
    for dims in [(0,), (1,), (4,), (2, 2)]:
        with pytest.raises(ValueError):
            flip_batch(x, dims)
    with pytest.raises(ValueError):
        flip_batch("x", (2,))
    with pytest.raises(ValueError):
        random_flip(x, p=1.5)
    with pytest.raises(ValueError):
        random_flip(torch.randn(3, 4))
    with pytest.raises(ValueError):
        random_flip(x, dims=(1,))
