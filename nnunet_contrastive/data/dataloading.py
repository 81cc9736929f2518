"""Slice-aware 2D data loading for semi-supervised and contrastive training, built on nnU-Net's own loader.

`SliceAwareDataLoader` subclasses nnU-Net's `nnUNetDataLoader` and reuses its case loading (`dataset.load_case`),
its bounding-box sampling with foreground oversampling (`get_bbox`), its cropping/padding (`crop_and_pad_nd`, image
padded with 0, segmentation with -1) and the per-sample augmentation pipeline it is given (normally
`nnUNetTrainer.get_training_transforms`). What it adds:

Batch (B = batch_size samples; labeled samples first, then unlabeled ones)
    data            float32 (B, C, py, px)         as nnU-Net
    target          int16 (B, 1, py, px), or a list of such tensors at the deep-supervision scales, as nnU-Net.
                    Unlabeled samples: filled with `unlabeled_target_value` (the dataset's ignore label if it has
                    one, else -1; -1 makes an unmasked CE loss fail loudly instead of learning "background").
    keys            np.ndarray (B,) of case ids     as nnU-Net
    slice_index     int64 (B,)   slice index in the ORIGINAL scan (preprocessed index + crop offset)
    num_slices      int64 (B,)   slices of the original scan
    position        float32 (B,) slice_index / (num_slices - 1), in [0, 1]
    partition       int64 (B,)   floor(slice_index * K / num_slices) (nnunet_contrastive.data.slices); -1 if K is None
    meta_labels     int64 (B, M) dataset-wide integer ids (MetadataTable.encoded) of the M meta-label columns
    meta_label_names list[str] (M,)
    contrastive_labels int64 (B, M') only with `contrastive_labels` names: the resolved meta-labels of the loss, in
                    order (partition, table columns, patient = case without a column); contrastive_label_names
    labeled         bool (B,)
    data_view2, target_view2   only with two_views=True: a second augmentation of the same sampled slice and crop

Non-tensor entries (keys, meta_label_names) pass through nnU-Net's augmenters unchanged: in nnU-Net 2.8 the
augmenters get `transform=None` (the loader augments per sample), `SingleThreadedAugmenter` returns the dict as is,
`NonDetMultiThreadedAugmenter` pickles it through a multiprocessing queue and its pin-memory step recurses into
tensors only.

Sampling (options combine freely)
    sampling='random'      nnU-Net's default: cases drawn with replacement, slice and in-plane crop from
                           nnU-Net's `get_bbox` (uniform, or the slice of a random foreground voxel for the last
                           round(0.33 * n) labeled samples).
    sampling='partition'   the papers' volume x partition sampler: each block of n samples is n/K distinct volumes x
                           K partitions, one slice drawn uniformly within each partition; rows ordered volume-major
                           (row = v*K + p, as in Chaitanya et al.). Foreground oversampling then only moves the in-plane
                           crop within the drawn slice (never biases the slice).
    num_unlabeled > 0      mixed batches: the last `num_unlabeled` samples come from the unlabeled datasets. Their
                           image alone is read (`<case>.b2nd` + `<case>.pkl`): the segmentation file is never opened
                           and `class_locations` is never used, so crops are uniform. The segmentation fed to the
                           transforms is derived from the image alone: -1 (nnU-Net's "outside the nonzero region",
                           also its padding value) where every channel is exactly 0, else 0; it only matters to
                           nnU-Net's MaskImageTransform (datasets with use_mask_for_norm, whose preprocessed images
                           are exactly 0 outside the nonzero region). The target is then overwritten.
    two_views=True         two augmentations of every sampled slice (see "What the views share").
    pseudo_labels=source   pseudo-label route (nnUNetTrainerPLCon): an unlabeled sample's pseudo-label (and its
                           quantised confidence, a second channel) replaces the image-derived segmentation fed to
                           the transforms, so it gets the image's crop and spatial transform; it is returned as
                           `pseudo_target` int16 (B, 1, py, px) (-1 on labeled rows) and `pseudo_confidence` float32
                           (0 on labeled rows); `target` of unlabeled rows stays the fill value.

What the views share (two_views=True)
    Always: the case, the slice and nnU-Net's loader crop (the `initial_patch_size` window chosen by get_bbox), i.e.
    the same input tensor. The transform pipeline is run twice on copies of that input.
    share_spatial=False (default, the papers' independent views, Peng et al.'s total_freedom=True): every parameter
    of the two runs is drawn independently.
    share_spatial=True: every transform of a type in `spatial_transform_types` (default: batchgeneratorsv2's
    SpatialTransform - rotation, scaling, elastic deformation, final crop - and MirrorTransform), and the coin flip
    of any RandomTransform wrapping one, draws its parameters in the first run and replays exactly those parameters
    in the second run. All other transforms (noise, blur, brightness, contrast, low resolution, gamma) draw
    independently. The two views are then pixel-aligned and their targets are identical (dense/local losses).

Unlabeled datasets are nnU-Net datasets (`nnUNetDatasetBlosc2` / `nnUNetDatasetNumpy`) with their own folder and
case list: the fold's unlabeled training cases in the labeled folder, and/or the `<data_identifier>_unlabeled`
sibling folder written by `nnunet-contrastive preprocess-unlabeled`.

`build_semi_dataloaders(trainer, ...)` builds train/val loaders for an overridden `nnUNetTrainer.get_dataloaders()`
exactly as nnU-Net does (same transforms, same augmenter wrapping) with these options.
"""
from __future__ import annotations

import copy
import os
from typing import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_pickle
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import (nnUNetBaseDataset, nnUNetDatasetBlosc2,
                                                          nnUNetDatasetNumpy)
from threadpoolctl import threadpool_limits

from nnunet_contrastive.data import slices as S
from nnunet_contrastive.prep.preprocess_unlabeled import UNLABELED_SUFFIX
from nnunet_contrastive.data.metadata import METADATA_FILENAME, MetadataError, MetadataTable, read_metadata
from nnunet_contrastive.data.meta_labels import PARTITION, MetaLabelError, label_tensor
from nnunet_contrastive.data.metadata import PATIENT_COLUMN

SAMPLING_MODES = ("random", "partition")
SPATIAL_TRANSFORM_TYPES: tuple[type, ...] = (SpatialTransform, MirrorTransform)
UNLABELED_FOLDER_SUFFIX = UNLABELED_SUFFIX  # one definition, owned by the writer (preprocess-unlabeled)


# ---------------------------------------------------------------------------------------------------- shared views
class SharedParamsTransform(BasicTransform):
    """Wraps a transform so that its parameters can be recorded in one call and replayed in the next.

    mode 'free': draw parameters (normal behaviour); 'record': draw and keep them; 'replay': reuse the kept ones.
    Works for any transform that follows BasicTransform's protocol (``get_parameters`` then ``apply``).
    """

    def __init__(self, transform: BasicTransform):
        super().__init__()
        self.transform = transform
        self.mode = "free"
        self._params = None

    def __call__(self, **data_dict) -> dict:
        if self.mode == "replay":
            if self._params is None:
                raise RuntimeError("SharedParamsTransform: replay requested before any parameters were recorded.")
            params = self._params
        else:
            params = self.transform.get_parameters(**data_dict)
            self._params = params if self.mode == "record" else None
        return self.transform.apply(data_dict, **params)

    def __repr__(self):
        return f"SharedParamsTransform({self.transform!r})"


def share_spatial_parameters(transforms: BasicTransform, spatial_types: tuple[type, ...] = SPATIAL_TRANSFORM_TYPES
                             ) -> tuple[BasicTransform, list[SharedParamsTransform]]:
    """A deep copy of `transforms` whose spatial transforms are wrapped in `SharedParamsTransform`.

    Recurses into containers with a ``transforms`` list (ComposeTransforms) and into RandomTransform (whose coin flip
    is then shared as well). Returns (pipeline, wrappers); set ``w.mode`` on every wrapper to record / replay.
    Raises ValueError for a spatial transform inside a OneOfTransform (its choice cannot be replayed).
    """
    wrappers: list[SharedParamsTransform] = []

    def contains_spatial(t) -> bool:
        if isinstance(t, spatial_types):
            return True
        if isinstance(getattr(t, "transforms", None), list):
            return any(contains_spatial(c) for c in t.transforms)
        if isinstance(t, RandomTransform):
            return contains_spatial(t.transform)
        if isinstance(t, OneOfTransform):
            return any(contains_spatial(c) for c in t.list_of_transforms)
        return False

    def wrap(t):
        if isinstance(t, spatial_types):
            w = SharedParamsTransform(t)
            wrappers.append(w)
            return w
        if isinstance(getattr(t, "transforms", None), list):
            t.transforms = [wrap(c) for c in t.transforms]
            return t
        if isinstance(t, RandomTransform):
            if contains_spatial(t.transform):
                t.transform = wrap(t.transform)
                w = SharedParamsTransform(t)
                wrappers.append(w)
                return w
            return t
        if isinstance(t, OneOfTransform) and contains_spatial(t):
            raise ValueError("share_spatial=True cannot replay a spatial transform inside a OneOfTransform; "
                             "use share_spatial=False or restructure the pipeline.")
        return t

    pipeline = wrap(copy.deepcopy(transforms))
    return pipeline, wrappers


# ---------------------------------------------------------------------------------------------------- loading
def load_image_only(dataset: nnUNetBaseDataset, identifier: str):
    """(data (c, z, y, x) array-like, properties) of a case, without opening its segmentation file."""
    folder = dataset.source_folder
    if isinstance(dataset, nnUNetDatasetBlosc2):
        import blosc2

        data = blosc2.open(urlpath=join(folder, identifier + ".b2nd"), mode="r", dparams={"nthreads": 1},
                           **dataset.mmap_kwargs)
    elif isinstance(dataset, nnUNetDatasetNumpy):
        npy = join(folder, identifier + ".npy")
        data = np.load(npy, mmap_mode="r") if isfile(npy) else np.load(join(folder, identifier + ".npz"))["data"]
    else:
        raise TypeError(f"unlabeled cases need an nnUNetDatasetBlosc2 or nnUNetDatasetNumpy, got {type(dataset)}.")
    properties = load_pickle(join(folder, identifier + ".pkl"))
    return data, properties


def _slice_class_locations(class_locations: dict, z: int) -> dict:
    """class_locations restricted to preprocessed slice z, with the z column set to 0 (for a (1, y, x) bbox)."""
    out = {}
    for k, v in class_locations.items():
        v = np.asarray(v)
        if v.size == 0:
            out[k] = v
            continue
        rows = v[v[:, 1] == z].copy()
        rows[:, 1] = 0
        out[k] = rows
    return out


class SliceAwareDataLoader(nnUNetDataLoader):
    """nnU-Net's 2D loader plus slice position, partition, meta-labels, unlabeled samples and two views.

    Shapes and options: see the module docstring. `data` holds the labeled cases (nnU-Net dataset), `unlabeled` a
    sequence of datasets whose cases are loaded image-only. `batch_size` is the total B; the last `num_unlabeled`
    samples of every batch are unlabeled. `patch_size` / `final_patch_size` are 2D (y, x).
    """

    def __init__(self, data: nnUNetBaseDataset, batch_size: int, patch_size, final_patch_size, label_manager,
                 oversample_foreground_percent: float = 0.0, sampling_probabilities=None, pad_sides=None,
                 probabilistic_oversampling: bool = False, transforms=None, *,
                 unlabeled: Sequence[nnUNetBaseDataset] = (), num_unlabeled: int = 0, sampling: str = "random",
                 num_partitions: int | None = 3, two_views: bool = False, share_spatial: bool = False,
                 metadata: MetadataTable | None = None, meta_label_columns: Sequence[str] | None = None,
                 unlabeled_target_value: int | None = None, contrastive_labels: Sequence[str] = (),
                 spatial_transform_types: tuple[type, ...] = SPATIAL_TRANSFORM_TYPES, validate: bool = True,
                 pseudo_labels=None):
        if len(patch_size) != 2 or len(final_patch_size) != 2:
            raise ValueError(f"SliceAwareDataLoader is for 2d configurations: patch_size must be (y, x), got "
                             f"{tuple(patch_size)} / {tuple(final_patch_size)}.")
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager, oversample_foreground_percent,
                         sampling_probabilities, pad_sides, probabilistic_oversampling, transforms)
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}.")
        if isinstance(num_unlabeled, bool) or not isinstance(num_unlabeled, (int, np.integer)) \
                or not 0 <= num_unlabeled <= batch_size:
            raise ValueError(f"num_unlabeled must be an integer in [0, batch_size={batch_size}], "
                             f"got {num_unlabeled!r}.")
        if num_partitions is not None:
            num_partitions = S._check_k(num_partitions)
        elif sampling == "partition":
            raise ValueError("sampling='partition' needs num_partitions (an integer >= 1).")
        self.sampling = sampling
        self.num_partitions = num_partitions
        self.num_unlabeled = int(num_unlabeled)
        self.num_labeled = int(batch_size) - self.num_unlabeled
        self.probabilistic_oversampling = probabilistic_oversampling
        self.two_views = bool(two_views)
        self.share_spatial = bool(share_spatial)

        # ---- case pools
        self.labeled_keys = list(data.identifiers)
        self.unlabeled_datasets = list(unlabeled)
        self.unlabeled_pool: list[tuple[int, str]] = [(d, k) for d, ds in enumerate(self.unlabeled_datasets)
                                                      for k in ds.identifiers]
        ukeys = [k for _, k in self.unlabeled_pool]
        dup = sorted({k for k in ukeys if ukeys.count(k) > 1})
        if dup:
            raise ValueError(f"unlabeled case id(s) {dup[:5]} appear in more than one unlabeled dataset.")
        both = sorted(set(ukeys) & set(self.labeled_keys))
        if both and self.num_labeled > 0:  # with no labeled rows (contrastive pre-training) every case is image-only
            raise ValueError(f"case(s) {both[:5]} are both labeled and unlabeled in this loader.")
        if self.num_labeled > 0 and not self.labeled_keys:
            raise ValueError(f"{self.num_labeled} labeled samples per batch requested but there are no labeled cases.")
        if self.num_unlabeled > 0 and not self.unlabeled_pool:
            raise ValueError(f"num_unlabeled={self.num_unlabeled} but no unlabeled cases were given "
                             f"(select a labeled subset or preprocess unlabeled images first).")
        if sampling == "partition":
            k = self.num_partitions
            for what, n, pool in (("labeled", self.num_labeled, len(self.labeled_keys)),
                                  ("unlabeled", self.num_unlabeled, len(self.unlabeled_pool))):
                if n % k:
                    raise ValueError(f"sampling='partition': the {n} {what} samples per batch must be a multiple of "
                                     f"num_partitions={k} (volumes x partitions), e.g. {max(k, n - n % k)}.")
                if n // k > pool:
                    raise ValueError(f"sampling='partition': {n // k} distinct {what} volumes per batch requested but "
                                     f"only {pool} {what} cases are available.")

        # ---- meta-labels
        if meta_label_columns is not None and metadata is None:
            raise ValueError(f"meta_label_columns={list(meta_label_columns)} given without a metadata table.")
        self.meta_label_names: list[str] = list(meta_label_columns if meta_label_columns is not None else
                                                (metadata.available_meta_labels() if metadata is not None else []))
        all_cases = list(dict.fromkeys(self.labeled_keys + ukeys))  # a case may be in both pools (num_labeled=0)
        self._meta: dict[str, list[int]] = {c: [] for c in all_cases}
        if self.meta_label_names:
            missing = [c for c in all_cases if c not in metadata.rows]
            if missing:
                raise MetadataError(f"{metadata.source}: case(s) {missing[:5]} of this loader have no metadata row "
                                    f"({len(missing)} in all). Add rows for them.")
            for col in self.meta_label_names:
                enc = metadata.encoded(col)
                for c in all_cases:
                    self._meta[c].append(enc[c])

        # ---- the (N, M) meta-label tensor of the contrastive loss, in the resolved order (data.meta_labels)
        self.contrastive_label_names = list(contrastive_labels)
        unknown = [m for m in self.contrastive_label_names
                   if m not in (PARTITION, PATIENT_COLUMN) and m not in self.meta_label_names]
        if unknown:
            raise MetaLabelError(f"contrastive meta-label(s) {unknown} are not columns of this loader's metadata "
                                 f"({self.meta_label_names}).")
        if PARTITION in self.contrastive_label_names and num_partitions is None:
            raise ValueError("the 'partition' meta-label needs num_partitions.")

        # ---- targets of unlabeled samples
        if unlabeled_target_value is None:
            unlabeled_target_value = label_manager.ignore_label if label_manager.has_ignore_label else -1
        self.unlabeled_target_value = int(unlabeled_target_value)

        # ---- second view
        self._shared: list[SharedParamsTransform] = []
        if self.two_views and self.share_spatial and self.transforms is not None:
            self.transforms, self._shared = share_spatial_parameters(self.transforms, spatial_transform_types)

        # ---- pseudo-labels of unlabeled cases (nnunet_contrastive.data.pseudo_labels; see _pseudo_segmentation)
        self.pseudo_labels = pseudo_labels
        if pseudo_labels is not None and self.num_unlabeled:
            missing = [k for _, k in self.unlabeled_pool if not pseudo_labels.has(k)]
            if missing:
                raise ValueError(f"{pseudo_labels!r} has no pseudo-label for unlabeled case(s) {missing[:5]} "
                                 f"({len(missing)} in all).")

        if validate:
            self.validate_cases()

    # ------------------------------------------------------------------ checks
    def _properties(self, labeled: bool, idx) -> tuple[str, dict]:
        if labeled:
            return idx, load_pickle(join(self._data.source_folder, idx + ".pkl"))
        d, key = idx
        return key, load_pickle(join(self.unlabeled_datasets[d].source_folder, key + ".pkl"))

    def validate_cases(self) -> None:
        """Read every case's .pkl and raise a ValueError naming the case if it cannot serve the requested
        partitions (fewer slices than partitions; in partition mode, a partition cropped away entirely)."""
        if self.num_partitions is None:
            return
        pools = []
        if self.num_labeled:
            pools += [(True, k) for k in self.labeled_keys]
        if self.num_unlabeled:
            pools += [(False, i) for i in self.unlabeled_pool]
        for labeled, idx in pools:
            case, props = self._properties(labeled, idx)
            n = S.num_original_slices(props)
            bounds = S.partition_bounds(n, self.num_partitions, case)
            if self.sampling == "partition":
                c0 = S.crop_offset(props)
                z = int(props["shape_after_cropping_and_before_resampling"][0])
                for p in range(self.num_partitions):
                    if min(bounds[p + 1], c0 + z) <= max(bounds[p], c0):
                        raise ValueError(
                            f"case '{case}': partition {p} (original slices {bounds[p]}..{bounds[p + 1] - 1} of {n}) "
                            f"was removed by nnU-Net's crop to the nonzero region (kept slices {c0}..{c0 + z - 1}); "
                            f"use fewer partitions or leave this case out.")

    # ------------------------------------------------------------------ sampling
    def _force_fg(self, j: int, n: int) -> bool:
        """nnU-Net's oversampling rule applied within a block of n labeled samples."""
        if self.probabilistic_oversampling:
            return self.get_do_oversample(j)
        return not j < round(n * (1 - self.oversample_foreground_percent))

    def _uniform_bbox(self, shape):
        # nnU-Net's get_bbox falls back to a uniformly random bbox when asked for foreground without any locations
        return self.get_bbox(shape, True, {})

    def _plan_block(self, n: int, labeled: bool) -> list[tuple]:
        """[(case index, partition or None), ...] for n samples of one block."""
        if n == 0:
            return []
        pool = self.labeled_keys if labeled else self.unlabeled_pool
        p = self.sampling_probabilities if labeled else None
        if self.sampling == "random":
            picks = np.random.choice(len(pool), n, replace=True, p=p)
            return [(pool[i], None) for i in picks]
        k = self.num_partitions
        vols = np.random.choice(len(pool), n // k, replace=False, p=p)
        return [(pool[v], part) for v in vols for part in range(k)]

    def _load(self, labeled: bool, idx):
        if labeled:
            data, seg, seg_prev, props = self._data.load_case(idx)
            return idx, data, seg, seg_prev, props
        d, key = idx
        data, props = load_image_only(self.unlabeled_datasets[d], key)
        return key, data, None, None, props

    # ------------------------------------------------------------------ pseudo-label route
    def _pseudo_segmentation(self, case: str, bbox, base: torch.Tensor) -> torch.Tensor:
        """The segmentation an unlabeled sample feeds to the transforms when the loader has pseudo-labels: the
        case's pseudo-label cropped with the image's bounding box (padded with -1, as nnU-Net pads labels), -1 where
        ``base`` is -1 (every image channel 0, as for image-only samples), plus, when the source carries
        confidence, a second channel with the confidence quantised to CONFIDENCE_LEVELS levels. Both channels
        then go through nnU-Net's transforms exactly like a segmentation (same spatial transform as the image)."""
        from nnunet_contrastive.data.pseudo_labels import CONFIDENCE_LEVELS

        pl, conf = self.pseudo_labels.load(case)
        seg = torch.from_numpy(np.array(crop_and_pad_nd(pl, bbox, -1), dtype=np.int16))[:, 0]  # a writable copy
        seg = torch.where(base == -1, torch.full_like(seg, -1), seg)
        if conf is None:
            return seg
        c = crop_and_pad_nd(np.asarray(conf, dtype=np.float32), bbox, 0)[:, 0]
        level = torch.from_numpy(np.rint(c * CONFIDENCE_LEVELS).astype(np.int16))
        return torch.cat((seg, level), dim=0)

    def _split_pseudo(self, tgt):
        """(target with the fill shape of a real target, pseudo-label (1, y, x) int16, confidence (1, y, x) float
        or None) from the transformed segmentation of an unlabeled sample with pseudo-labels."""
        from nnunet_contrastive.data.pseudo_labels import CONFIDENCE_LEVELS

        full = tgt[0] if isinstance(tgt, list) else tgt
        pseudo = full[:1].clone()
        conf = full[1:2].float().clamp(min=0) / CONFIDENCE_LEVELS if full.shape[0] > 1 else None
        tgt = [t[:1].clone() for t in tgt] if isinstance(tgt, list) else tgt[:1].clone()
        return tgt, pseudo, conf

    def _views(self, image: torch.Tensor, seg: torch.Tensor) -> list[tuple]:
        if self.transforms is None:
            return [(image, seg)] + ([(image.clone(), seg.clone())] if self.two_views else [])
        if not self.two_views:
            out = self.transforms(**{"image": image, "segmentation": seg})
            return [(out["image"], out["segmentation"])]
        image2, seg2 = image.clone(), seg.clone()  # before view 1: transforms may work in place
        try:
            for w in self._shared:
                w.mode = "record"
            out1 = self.transforms(**{"image": image, "segmentation": seg})
            for w in self._shared:
                w.mode = "replay"
            out2 = self.transforms(**{"image": image2, "segmentation": seg2})
        finally:
            for w in self._shared:
                w.mode = "free"
        return [(out1["image"], out1["segmentation"]), (out2["image"], out2["segmentation"])]

    def generate_train_batch(self) -> dict:
        plan = [(True, idx, part) for idx, part in self._plan_block(self.num_labeled, True)] + \
               [(False, idx, part) for idx, part in self._plan_block(self.num_unlabeled, False)]
        B, K = self.batch_size, self.num_partitions
        n_views = 2 if self.two_views else 1
        images: list = [None] * n_views
        targets: list = [None] * n_views
        keys, slice_index, num_slices, position, partition, labeled_flags = [], [], [], [], [], []
        pseudo: list = [None] * n_views  # pseudo-label route: (B, 1, y, x) int16, -1 on labeled rows
        pseudo_conf: list = [None] * n_views

        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, (labeled, idx, part) in enumerate(plan):
                case, data, seg, seg_prev, props = self._load(labeled, idx)
                shape = data.shape[1:]
                force_fg = labeled and self._force_fg(j, self.num_labeled)
                class_locations = props.get("class_locations") if labeled else None
                if part is None:  # nnU-Net's slice + crop choice
                    if labeled:
                        bbox_lbs, bbox_ubs = self.get_bbox(shape, force_fg, class_locations)
                    else:
                        bbox_lbs, bbox_ubs = self._uniform_bbox(shape)
                else:  # a slice drawn uniformly in partition `part`, then nnU-Net's in-plane crop
                    n = S.num_original_slices(props)
                    c0 = S.crop_offset(props)
                    bounds = S.partition_bounds(n, K, case)
                    lo, hi = max(bounds[part], c0) - c0, min(bounds[part + 1], c0 + shape[0]) - c0
                    if hi <= lo:
                        raise ValueError(f"case '{case}': partition {part} has no slice left after nnU-Net's crop.")
                    z = int(np.random.randint(lo, hi))
                    plane = (1, *shape[1:])
                    if labeled:
                        locations = None if class_locations is None else _slice_class_locations(class_locations, z)
                        bbox_lbs, bbox_ubs = self.get_bbox(plane, force_fg, locations)
                    else:
                        bbox_lbs, bbox_ubs = self._uniform_bbox(plane)
                    bbox_lbs, bbox_ubs = [z, *bbox_lbs[1:]], [z + 1, *bbox_ubs[1:]]
                bbox = [[a, b] for a, b in zip(bbox_lbs, bbox_ubs)]

                data_cropped = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()[:, 0]
                if labeled:
                    seg_cropped = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)
                                                   ).to(torch.int16)
                    if seg_prev is not None:
                        prev = torch.from_numpy(crop_and_pad_nd(seg_prev, bbox, -1, cast_cropped_to=np.int16)
                                                ).to(torch.int16)
                        seg_cropped = torch.cat((seg_cropped, prev[None]), dim=0)
                    seg_cropped = seg_cropped[:, 0]
                else:  # no label read: nnU-Net's "outside the nonzero region" (-1) where every channel is 0
                    seg_cropped = torch.where((data_cropped == 0).all(0, keepdim=True), -1, 0).to(torch.int16)
                    if self.pseudo_labels is not None:
                        seg_cropped = self._pseudo_segmentation(case, bbox, seg_cropped)

                for v, (img, tgt) in enumerate(self._views(data_cropped, seg_cropped)):
                    if self.pseudo_labels is not None:
                        if labeled:
                            pl_row, conf_row = None, None
                        else:
                            tgt, pl_row, conf_row = self._split_pseudo(tgt)
                        if pseudo[v] is None:
                            size = (B, 1, *img.shape[1:])
                            pseudo[v] = torch.full(size, -1, dtype=torch.int16)
                            if getattr(self.pseudo_labels, "confidence", False):
                                pseudo_conf[v] = torch.zeros(size, dtype=torch.float32)
                        if pl_row is not None:
                            pseudo[v][j] = pl_row
                            if pseudo_conf[v] is not None and conf_row is not None:
                                pseudo_conf[v][j] = conf_row
                    if not labeled:
                        tgt = [t.fill_(self.unlabeled_target_value) for t in tgt] if isinstance(tgt, list) \
                            else tgt.fill_(self.unlabeled_target_value)
                    if images[v] is None:
                        images[v] = torch.empty((B, *img.shape), dtype=torch.float32)
                        targets[v] = [torch.empty((B, *t.shape), dtype=t.dtype) for t in tgt] \
                            if isinstance(tgt, list) else torch.empty((B, *tgt.shape), dtype=tgt.dtype)
                    images[v][j] = img
                    if isinstance(tgt, list):
                        for s, t in enumerate(tgt):
                            targets[v][s][j] = t
                    else:
                        targets[v][j] = tgt

                i_orig, _, p, n = S.slice_position(bbox_lbs[0], props, K, case)
                keys.append(case)
                slice_index.append(i_orig)
                num_slices.append(n)
                partition.append(p)
                labeled_flags.append(labeled)

        slice_t = torch.tensor(slice_index, dtype=torch.int64)
        n_t = torch.tensor(num_slices, dtype=torch.int64)
        position = torch.from_numpy(S.relative_positions(slice_index, num_slices).astype(np.float32))
        batch = {
            "data": images[0], "target": targets[0], "keys": np.array(keys),
            "slice_index": slice_t, "num_slices": n_t, "position": position,
            "partition": torch.tensor(partition, dtype=torch.int64),
            "meta_labels": torch.tensor([self._meta[c] for c in keys], dtype=torch.int64).reshape(
                B, len(self.meta_label_names)),
            "meta_label_names": list(self.meta_label_names),
            "labeled": torch.tensor(labeled_flags, dtype=torch.bool),
        }
        if self.contrastive_label_names:
            batch["contrastive_labels"] = label_tensor(self.contrastive_label_names, keys, batch["partition"],
                                                       batch["meta_labels"], self.meta_label_names)
            batch["contrastive_label_names"] = list(self.contrastive_label_names)
        if self.two_views:
            batch["data_view2"], batch["target_view2"] = images[1], targets[1]
        if self.pseudo_labels is not None:
            for v, suffix in enumerate(["", "_view2"][:n_views]):
                batch["pseudo_target" + suffix] = pseudo[v]
                if pseudo_conf[v] is not None:
                    batch["pseudo_confidence" + suffix] = pseudo_conf[v]
        return batch


# ---------------------------------------------------------------------------------------------------- trainer helper
def find_metadata(trainer) -> MetadataTable | None:
    """The dataset's metadata.csv: the preprocessed dataset folder first, then nnUNet_raw/<dataset>; None if absent."""
    candidates = []
    if getattr(trainer, "preprocessed_dataset_folder_base", None):
        candidates.append(trainer.preprocessed_dataset_folder_base)
    raw = os.environ.get("nnUNet_raw")
    if raw:
        candidates.append(join(raw, trainer.plans_manager.dataset_name))
    for folder in candidates:
        if isfile(join(folder, METADATA_FILENAME)):
            return read_metadata(folder, trainer.dataset_json)
    return None


def unlabeled_folder_of(trainer) -> str:
    """`<nnUNet_preprocessed>/<dataset>/<data_identifier>_unlabeled` (written by preprocess-unlabeled)."""
    return trainer.preprocessed_dataset_folder + UNLABELED_FOLDER_SUFFIX


def unlabeled_folder_cases(trainer) -> list[str]:
    """Case ids in the trainer's `<data_identifier>_unlabeled` folder ([] when it does not exist)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = unlabeled_folder_of(trainer)
    if not os.path.isdir(folder):
        return []
    return list(infer_dataset_class(folder).get_identifiers(folder))


def wrap_like_nnunet(dl_tr, dl_val, device: torch.device):
    """Wrap two loaders in nnU-Net's augmenters exactly as nnUNetTrainer.get_dataloaders does and start them."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    n = get_allowed_n_proc_DA()
    if n == 0:
        mt_tr, mt_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
    else:
        mt_tr = NonDetMultiThreadedAugmenter(data_loader=dl_tr, transform=None, num_processes=n,
                                             num_cached=max(6, n // 2), seeds=None,
                                             pin_memory=device.type == "cuda", wait_time=0.002)
        mt_val = NonDetMultiThreadedAugmenter(data_loader=dl_val, transform=None, num_processes=max(1, n // 2),
                                              num_cached=max(3, n // 4), seeds=None,
                                              pin_memory=device.type == "cuda", wait_time=0.002)
    _ = next(mt_tr)
    _ = next(mt_val)
    return mt_tr, mt_val


def nnunet_transforms(trainer):
    """(train transforms, val transforms, initial_patch_size, patch_size) computed exactly as
    nnUNetTrainer.get_dataloaders does, through the trainer's own (overridable) methods."""
    patch_size = trainer.configuration_manager.patch_size
    deep_supervision_scales = trainer._get_deep_supervision_scales()
    rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    lm = trainer.label_manager
    tr_transforms = trainer.get_training_transforms(
        patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=trainer.is_cascaded,
        foreground_labels=lm.foreground_labels, regions=lm.foreground_regions if lm.has_regions else None,
        ignore_label=lm.ignore_label)
    val_transforms = trainer.get_validation_transforms(
        deep_supervision_scales, is_cascaded=trainer.is_cascaded, foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    return tr_transforms, val_transforms, initial_patch_size, patch_size


def build_semi_dataloaders(trainer, *, sampling: str = "random", num_labeled: int | None = None,
                           num_unlabeled: int = 0, num_partitions: int | None = 3, two_views: bool = False,
                           share_spatial: bool = False, unlabeled_keys: Sequence[str] | None = None,
                           unlabeled_folder: str | None = None, use_unlabeled_folder: bool = True,
                           metadata: MetadataTable | None = None, meta_label_columns: Sequence[str] | None = None,
                           unlabeled_target_value: int | None = None, val_num_partitions: int | None = None,
                           split: tuple[Sequence[str], Sequence[str]] | None = None, start: bool = True,
                           contrastive_labels: Sequence[str] = (), pseudo_labels=None):
    """(train_loader, val_loader) for an overridden ``get_dataloaders()``, built and wrapped like nnU-Net's.

    Transforms come from the trainer's own (static) ``get_training_transforms`` / ``get_validation_transforms``
    called with the arguments nnUNetTrainer.get_dataloaders uses; the loaders are `SliceAwareDataLoader`s wrapped in
    `SingleThreadedAugmenter` (nnUNet_n_proc_DA=0) or `NonDetMultiThreadedAugmenter`.

    Training batch = `num_labeled` (default: the trainer's batch size) labeled + `num_unlabeled` unlabeled samples.
    Labeled cases: the split's training cases (`split` = (train keys, val keys) when the caller already has them,
    else ``trainer.do_split()``; with nnunet-contrastive trainers the labeled subset). Unlabeled cases:
    `unlabeled_keys` (default ``trainer.unlabeled_keys``, the fold's unlabeled training cases) in the labeled folder,
    plus every case of `unlabeled_folder` (default ``<data_identifier>_unlabeled`` when it exists and
    `use_unlabeled_folder`). Validation: the fold's validation cases, random sampling, one view,
    labeled only, with slice positions and meta-labels (partitions with `val_num_partitions`, default
    `num_partitions`). Meta-labels: `metadata` or the dataset's metadata.csv (`find_metadata`); without a table
    `meta_labels` has M=0 columns. `contrastive_labels` (resolved meta-label names, nnunet_contrastive.data.meta_labels)
    makes training batches carry `contrastive_labels` (N, M) int64 in that order. `start=False` returns the unwrapped loaders (tests, benchmarks).
    `pseudo_labels` (a nnunet_contrastive.data.pseudo_labels.PseudoLabelSource): the training loader's unlabeled
    samples carry their pseudo-label (and confidence) through the transforms as a segmentation; batches get
    `pseudo_target` (and `pseudo_confidence`), never mixed into `target`.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    tr_transforms, val_transforms, initial_patch_size, patch_size = nnunet_transforms(trainer)
    lm = trainer.label_manager

    tr_keys, val_keys = trainer.do_split() if split is None else split
    if unlabeled_keys is None:
        unlabeled_keys = list(getattr(trainer, "unlabeled_keys", []) or [])
    ds_kwargs = dict(folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    dataset_tr = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(tr_keys), **ds_kwargs)
    dataset_val = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(val_keys), **ds_kwargs)
    unlabeled = []
    if unlabeled_keys:
        unlabeled.append(trainer.dataset_class(trainer.preprocessed_dataset_folder, list(unlabeled_keys)))
    folder = unlabeled_folder if unlabeled_folder is not None else unlabeled_folder_of(trainer)
    if use_unlabeled_folder and os.path.isdir(folder):
        ds_u = trainer.dataset_class(folder)
        if ds_u.identifiers:
            unlabeled.append(ds_u)
    elif unlabeled_folder is not None and use_unlabeled_folder:
        raise ValueError(f"unlabeled_folder {unlabeled_folder} does not exist.")

    if metadata is None:
        metadata = find_metadata(trainer)
    batch_size = getattr(trainer, "batch_size", None) or trainer.configuration_manager.batch_size
    if num_labeled is None:
        num_labeled = batch_size
    common = dict(label_manager=lm, oversample_foreground_percent=trainer.oversample_foreground_percent,
                  sampling_probabilities=None, pad_sides=None,
                  probabilistic_oversampling=trainer.probabilistic_oversampling, metadata=metadata,
                  meta_label_columns=meta_label_columns)
    dl_tr = SliceAwareDataLoader(
        dataset_tr, num_labeled + num_unlabeled, initial_patch_size, patch_size, transforms=tr_transforms,
        unlabeled=unlabeled, num_unlabeled=num_unlabeled, sampling=sampling, num_partitions=num_partitions,
        two_views=two_views, share_spatial=share_spatial, unlabeled_target_value=unlabeled_target_value,
        contrastive_labels=contrastive_labels, pseudo_labels=pseudo_labels, **common)
    dl_val = SliceAwareDataLoader(
        dataset_val, batch_size, patch_size, patch_size, transforms=val_transforms, sampling="random",
        num_partitions=num_partitions if val_num_partitions is None else val_num_partitions, **common)
    if not start:
        return dl_tr, dl_val
    return wrap_like_nnunet(dl_tr, dl_val, trainer.device)
