"""Slice position of 2D samples: original slice index, relative position and partition (the papers' meta-label).

Coordinates
-----------
nnU-Net's 2d configuration never resamples the slice axis (axis 0 of the preprocessed ``(c, z, y, x)`` arrays), but
preprocessing crops every case to its nonzero region. So for a slice at index ``i_pre`` of the preprocessed array::

    original index      i = i_pre + properties['bbox_used_for_cropping'][0][0]
    slices in the scan  n = properties['shape_before_cropping'][0]
    relative position   r = i / (n - 1)          (0 for a single-slice scan), in [0, 1]

Partition rule (K partitions, any n >= K)
-----------------------------------------
``partition(i) = floor(i * K / n)``: K contiguous blocks of slices, as equal as possible. Partition p holds the
slices ``ceil(p*n/K) <= i < ceil((p+1)*n/K)`` (see `partition_bounds`), i.e. floor(n/K) or ceil(n/K) slices, and the
larger blocks are spread over the scan, the first block being always one of the larger ones. Every slice belongs
to exactly one partition and every partition is non-empty. Examples (sizes of partitions 0..K-1):

    n=10, K=3: 4,3,3     n=11, K=3: 4,4,3     n=12, K=8: 2,1,2,1,2,1,2,1

How this differs from the authors' code (docs/methods.md A.3, B.2):

- Peng et al., ACDC (K=3): ``cp = n // 3``; ``i <= cp-1`` -> 0, ``i <= 2cp`` -> 1, else 2. Sizes cp, cp+1,
  n-2cp-1: the middle partition always gets one extra slice, even when 3 divides n (n=9: 3,4,2; n=10: 3,4,3;
  n=11: 3,4,4; ours: 3,3,3; 4,3,3; 4,4,3).
- Peng et al., prostate / MMWHS: ``i // (n//K + 1)``. Blocks of n//K+1 slices, so the last partition is short and
  some partitions can be empty (n=9, K=3: 4,4,1; n=12, K=8: blocks of 2 fill only partitions 0..5).
- Chaitanya et al.: partition k is ``[k*floor(n/K), (k+1)*floor(n/K))``; the last ``n mod K`` slices belong to no
  partition and are never sampled (n=10, K=3: 3,3,3 and slice 9 unused). Ours uses every slice; it agrees with
  Chaitanya's when K divides n.

A scan with fewer slices than partitions (n < K) has empty partitions under any contiguous rule: it raises a
`ValueError` that names the case.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def _check_k(num_partitions) -> int:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}.")
    return int(num_partitions)


def _label(case) -> str:
    return f"case '{case}'" if case is not None else "a scan"


def num_original_slices(properties: Mapping) -> int:
    """Number of slices of the original scan: ``properties['shape_before_cropping'][0]``."""
    try:
        return int(properties["shape_before_cropping"][0])
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"properties lack 'shape_before_cropping' (an nnU-Net preprocessed .pkl?): {e!r}") from None


def crop_offset(properties: Mapping) -> int:
    """First original slice kept by nnU-Net's crop to the nonzero region: ``bbox_used_for_cropping[0][0]``."""
    try:
        return int(properties["bbox_used_for_cropping"][0][0])
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"properties lack 'bbox_used_for_cropping' (an nnU-Net preprocessed .pkl?): {e!r}") from None


def original_slice_index(preprocessed_index, properties: Mapping, case: str | None = None):
    """Original slice index(es) of preprocessed slice index(es). Scalar in -> int out; array (any shape) in ->
    int64 array of the same shape out. Raises ValueError if a result falls outside ``[0, n)``."""
    offset, n = crop_offset(properties), num_original_slices(properties)
    idx = np.asarray(preprocessed_index, dtype=np.int64) + offset
    if np.any(idx < 0) or np.any(idx >= n):
        raise ValueError(f"{_label(case)}: preprocessed slice index {preprocessed_index} + crop offset {offset} is "
                         f"outside the original scan of {n} slices.")
    return int(idx) if idx.ndim == 0 else idx


def relative_position(index: int, n: int) -> float:
    """Relative position ``index / (n - 1)`` in [0, 1] of original slice `index` in a scan of `n` slices
    (0.0 when n == 1)."""
    index, n = int(index), int(n)
    if n < 1:
        raise ValueError(f"a scan needs at least one slice, got n={n}.")
    if not 0 <= index < n:
        raise ValueError(f"slice index {index} outside a scan of {n} slices.")
    return 0.0 if n == 1 else index / (n - 1)


def partition_index(index: int, n: int, num_partitions: int, case: str | None = None) -> int:
    """Partition ``floor(index * K / n)`` in ``[0, K)`` of original slice `index` in a scan of `n` slices."""
    k = _check_k(num_partitions)
    index, n = int(index), int(n)
    if n < k:
        raise ValueError(f"{_label(case)} has {n} slice(s), fewer than num_partitions={k}: some slice-position "
                         f"partitions would be empty. Use num_partitions <= {n} or leave this case out.")
    if not 0 <= index < n:
        raise ValueError(f"{_label(case)}: slice index {index} outside a scan of {n} slices.")
    return (index * k) // n


def partition_bounds(n: int, num_partitions: int, case: str | None = None) -> np.ndarray:
    """Boundaries ``b`` (int64, shape (K+1,)) with partition p = slices ``b[p] <= i < b[p+1]``; ``b[p] = ceil(p*n/K)``.

    ``b[0] = 0``, ``b[K] = n``, every block non-empty (n >= K required)."""
    k = _check_k(num_partitions)
    n = int(n)
    if n < k:
        raise ValueError(f"{_label(case)} has {n} slice(s), fewer than num_partitions={k}: some slice-position "
                         f"partitions would be empty. Use num_partitions <= {n} or leave this case out.")
    p = np.arange(k + 1, dtype=np.int64)
    return -((-p * n) // k)  # ceil(p * n / k) in integers


def relative_positions(indices, n) -> np.ndarray:
    """Vectorised `relative_position`: `indices` and `n` broadcast together; float64 array of the broadcast shape."""
    idx = np.asarray(indices, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    idx, n = np.broadcast_arrays(idx, n)
    if np.any(n < 1):
        raise ValueError(f"every scan needs at least one slice, got n={n[n < 1][0]}.")
    if np.any((idx < 0) | (idx >= n)):
        bad = np.argwhere((idx < 0) | (idx >= n))[0]
        raise ValueError(f"slice index {idx[tuple(bad)]} outside a scan of {n[tuple(bad)]} slices.")
    denom = np.maximum(n - 1, 1)
    return np.where(n == 1, 0.0, idx / denom)


def partition_indices(indices, n, num_partitions: int, cases=None) -> np.ndarray:
    """Vectorised `partition_index`: `indices`, `n` (and `cases`, one name per element, for error messages)
    broadcast together; int64 array of the broadcast shape."""
    k = _check_k(num_partitions)
    idx = np.asarray(indices, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    idx, n = np.broadcast_arrays(idx, n)
    few = n < k
    if np.any(few):
        pos = tuple(np.argwhere(few)[0])
        case = None if cases is None else np.broadcast_to(np.asarray(cases, dtype=object), n.shape)[pos]
        raise ValueError(f"{_label(case)} has {n[pos]} slice(s), fewer than num_partitions={k}: some slice-position "
                         f"partitions would be empty. Use num_partitions <= {n[pos]} or leave this case out.")
    out = (idx < 0) | (idx >= n)
    if np.any(out):
        pos = tuple(np.argwhere(out)[0])
        case = None if cases is None else np.broadcast_to(np.asarray(cases, dtype=object), n.shape)[pos]
        raise ValueError(f"{_label(case)}: slice index {idx[pos]} outside a scan of {n[pos]} slices.")
    return (idx * k) // n


def slice_position(preprocessed_index: int, properties: Mapping, num_partitions: int | None,
                   case: str | None = None) -> tuple[int, float, int, int]:
    """(original index, relative position, partition, n) of one preprocessed slice of an nnU-Net case.

    partition is -1 when `num_partitions` is None (no partition requested)."""
    n = num_original_slices(properties)
    i = original_slice_index(preprocessed_index, properties, case)
    part = -1 if num_partitions is None else partition_index(i, n, num_partitions, case)
    return i, relative_position(i, n), part, n
