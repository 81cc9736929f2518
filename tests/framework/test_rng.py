"""Random-generator states in checkpoints (nnunet_contrastive.framework.rng): a restored state draws exactly what the
saved one would have drawn, through a torch.save / torch.load(weights_only=True) round trip."""
import io
import random

import numpy as np
import pytest
import torch

from nnunet_contrastive.framework.rng import capture_rng_state, reseed_for_rank, restore_rng_state, seed_everything


def _draws() -> tuple:
    """One draw of every kind a training step makes: Python, NumPy (uniform, ints, gaussian), torch."""
    return (random.random(), random.randint(0, 10 ** 9), tuple(np.random.rand(3)), int(np.random.randint(0, 10 ** 9)),
            float(np.random.randn()), tuple(torch.rand(4).tolist()), tuple(torch.randperm(7).tolist()))


def test_restored_state_repeats_the_draws_through_a_weights_only_checkpoint():
    seed_everything(3)
    _draws()
    np.random.randn()  # leaves a cached gaussian in NumPy's legacy state: it must be carried too
    buffer = io.BytesIO()
    torch.save({"rng": capture_rng_state()}, buffer)
    expected = [_draws() for _ in range(3)]
    seed_everything(99)  # somewhere else entirely
    _draws()
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True)["rng"])
    assert [_draws() for _ in range(3)] == expected


def test_capture_does_not_advance_the_generators():
    seed_everything(5)
    capture_rng_state()
    a = _draws()
    seed_everything(5)
    assert _draws() == a


def test_incomplete_state_is_refused():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(ValueError, match="numpy"):
        restore_rng_state(state)


def test_ranks_get_their_own_streams_and_rank_zero_is_refused():
    streams = {}
    for rank in (1, 2):
        for epoch in (None, 4):
            reseed_for_rank(11, rank, epoch)
            streams[(rank, epoch)] = _draws()
    assert len(set(streams.values())) == 4
    reseed_for_rank(11, 2, 4)
    assert _draws() == streams[(2, 4)]  # deterministic
    seed_everything(11)
    assert _draws() not in streams.values()
    with pytest.raises(ValueError, match="rank 0"):
        reseed_for_rank(11, 0)
