"""gamma schedule (Eq. 16) and per-pair loss bounds (Proposition 2) of Peng et al. 2021."""
import json
import math
import pickle

import pytest
import torch

from nnunet_contrastive.framework.schedules import (
    SCHEDULE_POWERS,
    GammaSchedule,
    gamma_at,
    pair_loss_bounds,
    paper_pair_loss_bounds,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0, "inversesquare", "linear", "square"])
def test_endpoints_clamping_and_monotonicity(power):
    kw = dict(gamma_start=3.5, gamma_end=50.0, max_epoch=80, power=power)
    assert gamma_at(0, **kw) == 3.5
    assert gamma_at(80, **kw) == 50.0
    assert gamma_at(-3, **kw) == 3.5 and gamma_at(200, **kw) == 50.0
    values = [gamma_at(t, **kw) for t in range(81)]
    assert all(b > a for a, b in zip(values, values[1:]))


def test_exponent_shapes():
    kw = dict(gamma_start=2.0, gamma_end=10.0, max_epoch=16)
    # at t = T/4: (1/4)^p = 1/2, 1/4, 1/16
    assert gamma_at(4, power="inversesquare", **kw) == pytest.approx(2.0 + 8.0 * 0.5)
    assert gamma_at(4, power="linear", **kw) == pytest.approx(2.0 + 8.0 * 0.25)
    assert gamma_at(4, power="square", **kw) == pytest.approx(2.0 + 8.0 / 16)
    assert gamma_at(4, power=3.0, **kw) == pytest.approx(2.0 + 8.0 / 64)
    assert gamma_at(2.5, power=1.0, **kw) == pytest.approx(2.0 + 8.0 * 2.5 / 16)  # fractional epochs
    assert SCHEDULE_POWERS == {"inversesquare": 0.5, "linear": 1.0, "square": 2.0}
    assert GammaSchedule(1.0, 2.0, 10).power == 0.5  # the authors' default


def test_stepper_and_state_round_trip():
    s = GammaSchedule(5.0, 60.0, max_epoch=10, power="inversesquare")
    seen = [s.current]
    for _ in range(4):
        seen.append(s.step())
    assert seen == [s.value(t) for t in range(5)] and seen[0] == 5.0 and s.epoch == 4

    state = s.state_dict()
    state = json.loads(json.dumps(state))  # plain Python scalars
    r = GammaSchedule(1.0, 2.0, max_epoch=3, power=2.0)  # different config: restored from the state
    r.load_state_dict(state)
    assert r.state_dict() == s.state_dict()
    assert [r.step() for _ in range(8)] == [s.step() for _ in range(8)]
    assert r.current == 60.0  # clamped past max_epoch
    assert pickle.loads(pickle.dumps(r)).state_dict() == r.state_dict()

    with pytest.raises(ValueError, match="missing"):
        r.load_state_dict({"epoch": 1})


@pytest.mark.parametrize("kwargs", [
    dict(gamma_start=0.0), dict(gamma_start=-1.0), dict(gamma_end=float("inf")), dict(gamma_end=float("nan")),
    dict(max_epoch=0), dict(max_epoch=2.5), dict(power=0.0), dict(power=-1.0), dict(power="cosine"),
])
def test_schedule_value_errors(kwargs):
    args = dict(gamma_start=1.0, gamma_end=5.0, max_epoch=10, power=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError):
        gamma_at(3, **args)
    with pytest.raises(ValueError):
        GammaSchedule(**args)
    with pytest.raises(ValueError):
        GammaSchedule(1.0, 5.0, 10, epoch=-1)


@pytest.mark.parametrize("n,tau", [(2, 0.07), (5, 0.1), (30, 0.07), (3, 1.0), (4, 0.005)])
def test_bounds_formulas(n, tau):
    lo, hi = pair_loss_bounds(n, tau)
    # Eq. 12 / 13 evaluated directly where it does not overflow
    if 2.0 / tau < 700:
        assert lo == pytest.approx(math.log(1 + 2 * (n - 1) * math.exp(-2 / tau)), rel=1e-12)
        assert hi == pytest.approx(math.log(1 + 2 * (n - 1) * math.exp(2 / tau)), rel=1e-12)
    assert 0 < lo < hi and math.isfinite(hi)
    plo, phi = paper_pair_loss_bounds(n, tau)
    assert plo <= lo and hi <= phi  # the relaxed statement of Proposition 2 contains the exact range
    assert pair_loss_bounds(1, tau) == (0.0, 0.0)
    with pytest.raises(ValueError):
        pair_loss_bounds(0, tau)
    with pytest.raises(ValueError):
        pair_loss_bounds(n, 0.0)


@pytest.mark.parametrize("n,tau", [(3, 0.5), (4, 0.2)])
def test_bounds_are_attained_and_contain_random_pair_losses(n, tau):
    from nnunet_contrastive.losses import pair_loss_matrix

    lo, hi = pair_loss_bounds(n, tau)
    e = torch.zeros(4, dtype=torch.float64)
    e[0] = 1.0
    # anchor 0 (view 1 of sample 0), its pair N (view 2 of sample 0) = same direction, every other view opposite
    z1 = (-e).repeat(n, 1)
    z1[0] = e
    z2 = (-e).repeat(n, 1)
    z2[0] = e
    pl = pair_loss_matrix(z1, z2, tau)
    assert pl[0, n].item() == pytest.approx(lo, rel=1e-9, abs=1e-12)
    # the opposite configuration attains the maximum
    z2[0] = -e
    z1[1:] = e
    z2[1:] = e
    assert pair_loss_matrix(z1, z2, tau)[0, n].item() == pytest.approx(hi, rel=1e-9)

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)
    off = pair_loss_matrix(z1, z2, tau)[~torch.eye(2 * n, dtype=torch.bool)]
    assert (off >= lo).all() and (off <= hi).all()
