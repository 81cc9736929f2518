"""CutMix boxes and pasting: box shape and area, the pasted rows against a NumPy reference, clear errors."""
import numpy as np
import pytest
import torch

from nnunet_contrastive.components.cutmix import box_masks, partners, paste


def _is_one_box(mask: np.ndarray) -> bool:
    """True when the nonzero pixels of ``mask`` fill exactly their bounding box."""
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        return False
    box = tuple(slice(i.min(), i.max() + 1) for i in idx)
    return bool(mask[box].all()) and int(mask.sum()) == int(np.prod([s.stop - s.start for s in box]))


@pytest.mark.parametrize("shape", [(64, 48), (16, 32, 24)])
def test_one_box_per_row_of_the_requested_area(shape):
    g = torch.Generator().manual_seed(0)
    m = box_masks(40, shape, area=0.5, generator=g).numpy()
    assert m.shape == (40, 1) + shape and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    for row in m[:, 0]:
        assert _is_one_box(row)
        # sides rounded to whole pixels: the area is 0.5 up to one pixel row per side
        assert abs(row.mean() - 0.5) < sum(1.0 / s for s in shape) + 1e-6
    # boxes differ in shape and place from row to row
    assert len({m[i, 0].tobytes() for i in range(40)}) == 40


def test_area_range_and_seeding():
    a = box_masks(200, (50, 50), area=(0.2, 0.6), generator=torch.Generator().manual_seed(1))
    b = box_masks(200, (50, 50), area=(0.2, 0.6), generator=torch.Generator().manual_seed(1))
    c = box_masks(200, (50, 50), area=(0.2, 0.6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    fractions = a.mean(dim=(1, 2, 3)).numpy()
    assert fractions.min() >= 0.2 - 0.04 and fractions.max() <= 0.6 + 0.04
    assert fractions.max() - fractions.min() > 0.25  # the range is used, not its middle


def test_global_generator_by_default():
    torch.manual_seed(3)
    a = box_masks(4, (20, 20))
    torch.manual_seed(3)
    assert torch.equal(a, box_masks(4, (20, 20)))


def test_paste_matches_numpy_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 6, 5, generator=g)
    m = box_masks(3, (6, 5), 0.4, generator=g)
    p = partners(3)
    assert p.tolist() == [1, 2, 0]
    xn, mn = x.numpy(), m.numpy()
    ref = np.empty_like(xn)
    for i in range(3):
        j = (i + 1) % 3
        for c in range(2):
            ref[i, c] = np.where(mn[i, 0] == 1, xn[j, c], xn[i, c])
    np.testing.assert_array_equal(paste(x, m, p).numpy(), ref)


def test_clear_errors():
    with pytest.raises(ValueError, match="area"):
        box_masks(2, (8, 8), area=1.0)
    with pytest.raises(ValueError, match="area"):
        box_masks(2, (8, 8), area=(0.6, 0.3))
    with pytest.raises(ValueError, match="spatial_shape"):
        box_masks(2, (8,))
    with pytest.raises(ValueError, match="at least 2 rows"):
        partners(1)
    with pytest.raises(ValueError, match="do not fit"):
        paste(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5), partners(2))
