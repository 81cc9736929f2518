"""The step context: terms that need the same features share one forward pass; flips are undone."""
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_contrastive.framework.context import StepContext


def _net():
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv2d, 3, (1, 2, 2), 2, 3, (2, 2), True,
                         torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"data": torch.randn(4, 1, 16, 16, generator=g), "data_view2": torch.randn(4, 1, 16, 16, generator=g),
            "labeled": torch.tensor([True, True, False, False])}


def test_two_terms_reading_the_same_features_cost_one_forward_pass():
    net = _net()
    calls = []
    net.encoder.register_forward_hook(lambda *a: calls.append(1))
    ctx = StepContext(_batch(), torch.device("cpu"), net)
    sup = ctx.forward("student", 0).logits  # a supervised term: full pass over all rows
    unl = ctx.forward("student", 0, "unlabeled", encoder_only=True).bottleneck  # a contrastive term: subset
    again = ctx.forward("student", 0, "labeled").logits
    assert len(calls) == 1 and ctx.forward_calls == 1
    torch.testing.assert_close(unl, ctx.forward("student", 0).bottleneck[2:])
    torch.testing.assert_close(again, sup[:2])
    ctx.forward("student", 1, "unlabeled", encoder_only=True)  # another view: one more pass ...
    ctx.forward("student", 1, "unlabeled")  # ... whose decoder reuses the cached encoder output
    assert len(calls) == 2


def test_student_flip_is_undone_on_outputs_and_taps():
    net = _net().eval()
    batch = _batch()
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):  # draws until a flip happens
        ctx = StepContext(batch, torch.device("cpu"), net, flip_generator=gen)
        f = ctx.forward("student", 0)
        if ctx._flip_dims:
            break
    dims = ctx._flip_dims
    assert dims
    with torch.no_grad():
        direct = net(torch.flip(batch["data"], dims))
    torch.testing.assert_close(f.logits, torch.flip(direct[0], dims))
    assert f.decoder[-1].shape[-2:] == (16, 16)


def test_teacher_pass_has_no_gradient():
    net, teacher = _net(), _net()
    ctx = StepContext(_batch(), torch.device("cpu"), net, teacher=teacher)
    assert ctx.forward("student", 0).logits.requires_grad
    assert not ctx.forward("teacher", 1, "unlabeled").logits.requires_grad


def test_two_views_in_one_pass_equal_two_separate_passes():
    net = _net()
    calls = []
    net.encoder.register_forward_hook(lambda *a: calls.append(1))
    ctx = StepContext(_batch(), torch.device("cpu"), net)
    f0, f1 = ctx.forward_views("student", (0, 1), "unlabeled")
    assert len(calls) == 1 and ctx.forward_calls == 1
    assert f0.bottleneck.shape[0] == 2 and f1.logits.shape[0] == 2
    assert ctx.forward("student", 1, "unlabeled") is f1  # cached per view
    assert len(calls) == 1
    ref = StepContext(_batch(), torch.device("cpu"), net)
    for view, f in ((0, f0), (1, f1)):  # instance norm: a concatenated pass changes nothing per row
        r = ref.forward("student", view, "unlabeled")
        torch.testing.assert_close(f.bottleneck, r.bottleneck, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f.logits, r.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f.decoder[-1], r.decoder[-1], rtol=1e-4, atol=1e-5)
    # gradients reach the network through the concatenated pass
    (f0.bottleneck.sum() + f1.bottleneck.sum()).backward()
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad is not None


def test_two_views_with_a_flipped_student_fall_back_to_separate_passes():
    net = _net()
    ctx = StepContext(_batch(), torch.device("cpu"), net, flip_generator=torch.Generator().manual_seed(0))
    ctx.forward_views("student", (0, 1), encoder_only=True)
    assert ctx.forward_calls == 2


def test_supervised_term_shares_the_all_rows_pass_or_runs_on_its_rows_only():
    from nnunet_contrastive.terms import SupervisedTerm
    batch = dict(_batch(), target=[torch.zeros(4, 1, 16, 16)])
    seen = []

    def loss_fn(out, target):
        seen.append(out[0].shape[0])
        return out[0].float().mean()

    shared = StepContext(batch, torch.device("cpu"), _net())
    lean = StepContext(batch, torch.device("cpu"), _net())
    a, _ = SupervisedTerm(loss_fn)(shared, "labeled")
    b, _ = SupervisedTerm(loss_fn, shared_pass=False)(lean, "labeled")
    assert seen == [2, 2]  # the loss sees the labeled rows either way ...
    torch.testing.assert_close(a, b)  # ... with the same outputs (instance norm: rows are independent)
    shared.forward("student", 0, "unlabeled")
    lean.forward("student", 0, "unlabeled")
    assert shared.forward_calls == 1 and lean.forward_calls == 2  # the lean pass computed no unlabeled row


def test_forward_input_is_one_uncached_pass_with_gradients_for_the_student_only():
    net, teacher = _net(), _net()
    ctx = StepContext(_batch(), torch.device("cpu"), net, teacher=teacher)
    x = torch.randn(3, 1, 16, 16)
    s = ctx.forward_input("student", x).logits
    t = ctx.forward_input("teacher", x).logits
    assert ctx.forward_calls == 2 and s.requires_grad and not t.requires_grad
    out = net(x)
    torch.testing.assert_close(s, out[0] if isinstance(out, (list, tuple)) else out)
