"""Meta-labels, resolved once: which ones a run uses, and the (N, M) integer tensor the contrastive loss takes.

A trainer wishes for meta-labels (``meta_labels``, in order) and may require some (``required_meta_labels``). The
dataset provides the slice ``partition`` (always, from the slice position) plus the meta-label columns of its
``metadata.csv`` (``patient`` always: without a column every case is its own patient). :func:`resolve` returns the
wished ones the dataset has, logs the skipped ones, and stops with :class:`MetaLabelError` when a required one is
missing. The loader then emits ``contrastive_labels`` (N, M) int64 in exactly that order (:func:`label_tensor`);
terms read the tensor, never a column by name.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from nnunet_contrastive.data.metadata import PATIENT_COLUMN

__all__ = ["PARTITION", "MetaLabelError", "available", "resolve", "label_tensor"]

PARTITION = "partition"


class MetaLabelError(ValueError):
    """A trainer needs a meta-label the dataset does not provide, or a case has no metadata row."""


def available(table, cases: Sequence[str], dataset_name: str, log: Callable[[str], None] = print) -> list[str]:
    """Meta-labels the dataset provides for ``cases``: partition + the table's columns (or partition and patient
    = case id without a table). Every case must have a metadata row."""
    if table is None:
        log("No metadata.csv found: meta-labels are slice partition and patient = case id.")
        return [PARTITION, PATIENT_COLUMN]
    missing = [c for c in cases if c not in table.rows]
    if missing:
        raise MetaLabelError(f"{table.source}: training case(s) {missing[:5]} have no metadata row ({len(missing)} in "
                             f"all). Run 'nnunet-contrastive check -d {dataset_name}'.")
    return [PARTITION] + table.available_meta_labels()


def resolve(who: str, wanted: Sequence[str], required: Sequence[str], provided: Sequence[str], dataset_name: str,
            log: Callable[[str], None] = print) -> list[str]:
    """The meta-labels a run uses: ``wanted`` ones in ``provided`` (in ``wanted`` order); a missing required one
    raises :class:`MetaLabelError` naming the trainer, the dataset and the fix."""
    provided = list(provided)
    missing_required = [m for m in required if m not in provided]
    if missing_required:
        raise MetaLabelError(
            f"{who} needs meta-label(s) {missing_required}, which dataset '{dataset_name}' does not provide "
            f"(available: {provided}). Add the column to metadata.csv (docs/data_format.md) or use a trainer that "
            f"does not need it.")
    used = [m for m in wanted if m in provided]
    skipped = [m for m in wanted if m not in provided]
    if skipped:
        log(f"Meta-label(s) {skipped} not in this dataset: training on {used}.")
    return used


def label_tensor(names: Sequence[str], keys: Sequence[str], partition: torch.Tensor,
                 meta: Optional[torch.Tensor], meta_names: Sequence[str]) -> torch.Tensor:
    """(N, M) int64: column m = meta-label ``names[m]`` of each row. ``partition`` (N,), ``meta`` (N, C) dataset-wide
    ids of the table columns ``meta_names``. ``patient`` without a column: one id per distinct case key."""
    n = len(keys)
    cols = []
    for m in names:
        if m == PARTITION:
            cols.append(torch.as_tensor(partition).long())
        elif m in meta_names:
            cols.append(torch.as_tensor(meta)[:, list(meta_names).index(m)].long())
        elif m == PATIENT_COLUMN:
            _, inv = np.unique(np.asarray(keys), return_inverse=True)
            cols.append(torch.as_tensor(inv.reshape(-1)).long())
        else:
            raise MetaLabelError(f"meta-label '{m}' is not in this loader's table (columns {list(meta_names)}).")
    return torch.stack(cols, dim=1) if cols else torch.zeros((n, 0), dtype=torch.int64)
