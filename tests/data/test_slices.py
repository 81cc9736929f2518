"""Slice position, relative position and partitions (nnunet_contrastive.data.slices) against hand-computed tables."""
import numpy as np
import pytest

from nnunet_contrastive.data import slices as S

# partition of every slice 0..n-1, worked out by hand from floor(i*K/n)
PARTITION_TABLES = {
    (10, 3): [0, 0, 0, 0, 1, 1, 1, 2, 2, 2],
    (11, 3): [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2],
    (9, 3): [0, 0, 0, 1, 1, 1, 2, 2, 2],
    (12, 8): [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7],
    (5, 4): [0, 0, 1, 2, 3],
    (3, 3): [0, 1, 2],
    (7, 1): [0, 0, 0, 0, 0, 0, 0],
    (1, 1): [0],
}
# first slice of each partition, plus n
BOUNDS = {
    (10, 3): [0, 4, 7, 10],
    (11, 3): [0, 4, 8, 11],
    (12, 8): [0, 2, 3, 5, 6, 8, 9, 11, 12],
    (5, 4): [0, 2, 3, 4, 5],
    (7, 1): [0, 7],
}


@pytest.mark.parametrize("n,k", list(PARTITION_TABLES))
def test_partition_table(n, k):
    expected = PARTITION_TABLES[(n, k)]
    assert [S.partition_index(i, n, k) for i in range(n)] == expected
    assert S.partition_indices(np.arange(n), n, k).tolist() == expected


@pytest.mark.parametrize("n,k", list(BOUNDS))
def test_partition_bounds_table(n, k):
    b = S.partition_bounds(n, k)
    assert b.tolist() == BOUNDS[(n, k)]
    # bounds and partition_index describe the same blocks
    for p in range(k):
        assert all(S.partition_index(i, n, k) == p for i in range(b[p], b[p + 1]))


def test_partition_blocks_are_contiguous_and_as_equal_as_possible():
    for k in range(1, 9):
        for n in range(k, 40):
            parts = S.partition_indices(np.arange(n), n, k)
            assert parts[0] == 0 and parts[-1] == k - 1
            assert np.all(np.diff(parts) >= 0) and np.all(np.diff(parts) <= 1)  # contiguous, none skipped
            sizes = np.bincount(parts, minlength=k)
            assert set(sizes.tolist()) <= {n // k, -(-n // k)}, (n, k, sizes)
            assert sizes.sum() == n


def test_differs_from_the_authors_rules_where_documented():
    """Peng ACDC (cp = n//3; i <= cp-1 -> 0, i <= 2cp -> 1, else 2): middle block gets cp+1 slices.
    Peng prostate/MMWHS: i // (n//K + 1). Chaitanya: [k*floor(n/K), (k+1)*floor(n/K)), remainder unused."""
    def peng(i, n):
        cp = n // 3
        return 0 if i <= cp - 1 else (1 if i <= 2 * cp else 2)

    def sizes(parts, k=3):
        return np.bincount(np.asarray(parts), minlength=k).tolist()

    for n, ours, theirs in [(9, [3, 3, 3], [3, 4, 2]), (10, [4, 3, 3], [3, 4, 3]), (11, [4, 4, 3], [3, 4, 4])]:
        assert sizes(S.partition_indices(np.arange(n), n, 3)) == ours
        assert sizes([peng(i, n) for i in range(n)]) == theirs
    assert sizes([i // (9 // 3 + 1) for i in range(9)]) == [4, 4, 1]
    for n, k in [(9, 3), (12, 4), (16, 8)]:  # Chaitanya's equal blocks when K divides n
        assert S.partition_indices(np.arange(n), n, k).tolist() == [min(i // (n // k), k - 1) for i in range(n)]


def test_relative_position_table():
    assert [S.relative_position(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert S.relative_position(0, 1) == 0.0
    assert S.relative_position(3, 7) == pytest.approx(0.5)
    np.testing.assert_allclose(S.relative_positions([0, 2, 4, 0, 6], [5, 5, 5, 1, 7]), [0, 0.5, 1, 0, 1])


def test_original_index_from_nnunet_properties():
    props = {"bbox_used_for_cropping": [[2, 9], [0, 32], [0, 32]], "shape_before_cropping": (11, 32, 32)}
    assert S.original_slice_index(0, props) == 2
    assert S.original_slice_index(6, props) == 8
    assert S.original_slice_index(np.array([0, 3, 8]), props).tolist() == [2, 5, 10]
    assert S.num_original_slices(props) == 11
    assert S.crop_offset(props) == 2
    # preprocessed slice 4 -> original 6 of 11: position 0.6, partition floor(6*3/11) = 1
    assert S.slice_position(4, props, 3, "c") == (6, pytest.approx(0.6), 1, 11)
    assert S.slice_position(4, props, None, "c")[2] == -1
    with pytest.raises(ValueError, match="outside the original scan"):
        S.original_slice_index(9, props, "caseX")


def test_fewer_slices_than_partitions_names_the_case():
    with pytest.raises(ValueError, match="case 'patient007_ED' has 2 slice"):
        S.partition_index(0, 2, 3, case="patient007_ED")
    with pytest.raises(ValueError, match="case 'thin' has 2 slice"):
        S.partition_indices([0, 1, 0], [5, 2, 5], 3, cases=["a", "thin", "b"])
    with pytest.raises(ValueError, match="case 'thin'"):
        S.partition_bounds(1, 2, case="thin")


@pytest.mark.parametrize("bad", [0, -1, 2.5, None, True])
def test_bad_num_partitions(bad):
    with pytest.raises(ValueError, match="num_partitions"):
        S.partition_index(0, 5, bad)


def test_out_of_range_index():
    with pytest.raises(ValueError, match="outside"):
        S.partition_index(5, 5, 2, "c")
    with pytest.raises(ValueError, match="outside"):
        S.relative_position(-1, 5)
    with pytest.raises(ValueError, match="outside"):
        S.relative_positions([0, 5], 5)


def test_missing_properties_key():
    with pytest.raises(ValueError, match="shape_before_cropping"):
        S.num_original_slices({})
