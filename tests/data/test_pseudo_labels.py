"""Pseudo-label store (round trip, interrupted rounds) and the loader route: a pseudo-label patch is the stored label
of the same case, slice and crop, under the same spatial transform as the image; real labels stay apart."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_contrastive.data.dataloading import SliceAwareDataLoader
from nnunet_contrastive.data.pseudo_labels import CONFIDENCE_LEVELS, PseudoLabelStore

SIZE = 16
LABELED = {"volA": 7, "volB": 9}
UNLABELED = {"volD": 6}          # in the labeled folder, flagged unlabeled
SIBLING = {"volE": 8}            # in the `_unlabeled` folder


def _pl(z: int) -> np.ndarray:
    """A stored pseudo-label: an asymmetric L whose position depends on the slice (so a wrong slice shows)."""
    pl = np.zeros((z, SIZE, SIZE), np.int16)
    for k in range(z):
        pl[k, 1 + k % 4: 9 + k % 4, 3:6] = 1
        pl[k, 7:9, 6:12 - k % 3] = 2
    return pl


def _conf(z: int) -> np.ndarray:
    return (0.35 + 0.6 * (np.arange(z * SIZE * SIZE).reshape(z, SIZE, SIZE) % 7) / 6).astype(np.float16)


def _write(folder, case, z, image, seg):
    props = {"shape_before_cropping": (z, SIZE, SIZE), "bbox_used_for_cropping": [[0, z], [0, SIZE], [0, SIZE]],
             "shape_after_cropping_and_before_resampling": (z, SIZE, SIZE), "spacing": [5.0, 1.0, 1.0],
             "class_locations": {c: np.argwhere(seg == c) for c in (1, 2)}}
    nnUNetDatasetBlosc2.save_case(image, seg, props, os.path.join(folder, case), chunks=(1, 1, SIZE, SIZE),
                                  blocks=(1, 1, SIZE, SIZE))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Labeled cases (label 1 everywhere in a box), unlabeled cases whose IMAGE encodes their pseudo-label
    (image = 10 + pseudo-label), their label files deleted, and a complete round 1 of pseudo-labels."""
    root = tmp_path_factory.mktemp("pl")
    lab, unl = root / "nnUNetPlans_2d", root / "nnUNetPlans_2d_unlabeled"
    lab.mkdir()
    unl.mkdir()
    for case, z in LABELED.items():
        seg = np.zeros((1, z, SIZE, SIZE), np.int16)
        seg[0, :, 4:12, 4:12] = 1
        _write(str(lab), case, z, np.full((1, z, SIZE, SIZE), 1.0, np.float32), seg)
    store = PseudoLabelStore(str(root / "pseudo_labels"))
    store.begin(1, {"epoch": 0, "network_sha1": "x"})
    for folder, cases in ((lab, UNLABELED), (unl, SIBLING)):
        for case, z in cases.items():
            _write(str(folder), case, z, (10.0 + _pl(z)[None]).astype(np.float32), np.zeros((1, z, SIZE, SIZE),
                                                                                          np.int16))
            os.remove(os.path.join(str(folder), f"{case}_seg.b2nd"))  # an unlabeled case's label is never read
            store.write_case(1, case, _pl(z), _conf(z))
    store.write_manifest(1, {"round": 1, "state": {"epoch": 0, "network_sha1": "x"}, "complete": True})
    return {"labeled": str(lab), "unlabeled": str(unl), "store": store}


def _loader(synth, transforms, confidence=True, batch_size=6, num_unlabeled=3, patch=(SIZE, SIZE)):
    lm = LabelManager({"background": 0, "a": 1, "b": 2}, None)
    unlabeled = [nnUNetDatasetBlosc2(synth["labeled"], list(UNLABELED)),
                 nnUNetDatasetBlosc2(synth["unlabeled"], list(SIBLING))]
    return SliceAwareDataLoader(nnUNetDatasetBlosc2(synth["labeled"], list(LABELED)), batch_size, patch, patch, lm,
                                unlabeled=unlabeled, num_unlabeled=num_unlabeled, transforms=transforms,
                                oversample_foreground_percent=0.33,
                                pseudo_labels=synth["store"].source(1, confidence=confidence))


class _SegAsImage:
    """Identity transform that appends the segmentation it was given to the image (what the loader fed in)."""

    def __call__(self, **d):
        seg = d["segmentation"].float()
        seg = torch.cat([seg, torch.zeros_like(seg)]) if seg.shape[0] == 1 else seg  # labeled rows: one channel
        return {"image": torch.cat([d["image"], seg]), "segmentation": d["segmentation"]}


def test_store_round_trip_and_interrupted_rounds(tmp_path):
    store = PseudoLabelStore(str(tmp_path / "pl"))
    state = {"epoch": 3, "network_sha1": "abc"}
    assert store.begin(2, state) == [] and not store.is_complete(2)
    store.write_case(2, "c1", _pl(3), _conf(3))
    store.write_case(2, "c2", _pl(4), _conf(4))
    assert store.begin(2, state) == ["c1", "c2"]  # same network: the written cases are kept
    with pytest.raises(RuntimeError, match="not complete"):
        store.source(2)
    assert store.begin(2, {"epoch": 2, "network_sha1": "def"}) == []  # another network: start over
    assert not os.path.exists(os.path.join(store.round_dir(2), "c1_pl.npy"))
    store.write_case(2, "c1", _pl(3), _conf(3))
    store.write_manifest(2, {"round": 2, "state": state, "complete": True})
    with pytest.raises(RuntimeError, match="never recomputed"):
        store.begin(2, state)
    pl, conf = store.source(2, confidence=True).load("c1")
    assert pl.dtype == np.int16 and pl.shape == (1, 3, SIZE, SIZE) and np.array_equal(pl[0], _pl(3))
    assert np.array_equal(conf[0], _conf(3))
    assert store.source(2).load("c1")[1] is None
    # changed fraction against the previous round
    store.begin(1, state)
    other = _pl(3)
    other[0, 0, :4] = 2
    store.write_case(1, "c1", other, _conf(3))
    assert store.changed_fraction(2, ["c1"]) == pytest.approx(4 / (3 * SIZE * SIZE))
    assert store.changed_fraction(1, ["c1"]) is None


def test_loader_feeds_the_stored_pseudo_label_of_the_same_slice_and_crop(synth):
    np.random.seed(0)
    dl = _loader(synth, _SegAsImage())
    seen = set()
    for _ in range(8):
        b = next(dl)
        lab = b["labeled"].numpy()
        assert lab.tolist() == [True] * 3 + [False] * 3
        for j in np.nonzero(~lab)[0]:
            case = str(b["keys"][j])
            z = int(b["slice_index"][j])
            img, seg_pl, seg_conf = b["data"][j, 0], b["data"][j, 1], b["data"][j, 2]
            zs = {**UNLABELED, **SIBLING}[case]
            # the image encodes the pseudo-label: the pseudo-label fed in is the one of this very slice and crop
            assert torch.equal(seg_pl, img - 10)
            assert torch.equal(seg_pl, torch.from_numpy(_pl(zs)[z]).float())
            assert torch.equal(seg_conf, torch.from_numpy(np.rint(_conf(zs)[z].astype(np.float32)
                                                                   * CONFIDENCE_LEVELS)).float())
            assert torch.equal(b["pseudo_target"][j, 0].float(), seg_pl)  # identity transform: passed through
            assert torch.allclose(b["pseudo_confidence"][j, 0], seg_conf / CONFIDENCE_LEVELS)
            assert (b["target"][j] == -1).all()  # never mixed into the real target
            seen.add(case)
        assert (b["pseudo_target"][lab] == -1).all() and (b["pseudo_confidence"][lab] == 0).all()
        assert b["target"].shape == b["pseudo_target"].shape and b["pseudo_target"].dtype == torch.int16
    assert seen == set(UNLABELED) | set(SIBLING)


def test_pseudo_label_gets_the_image_spatial_transform(synth):
    """Mirroring, rotation and scaling with nnU-Net's SpatialTransform (labels interpolated as nnU-Net does): the
    pseudo-label patch agrees with the identically transformed image, which encodes the pseudo-label."""
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    pipe = ComposeTransforms([
        SpatialTransform((SIZE, SIZE), 0, False, p_rotation=1.0, rotation=(-0.6, 0.6), p_scaling=1.0,
                         scaling=(0.8, 1.25), bg_style_seg_sampling=False, border_mode_seg="constant",
                         padding_value_seg=-1),
        MirrorTransform((0, 1))])
    np.random.seed(1)
    torch.manual_seed(1)
    dl = _loader(synth, pipe, confidence=False)
    agree = total = differs = 0
    for _ in range(6):
        b = next(dl)
        assert "pseudo_confidence" not in b
        for j in range(3, 6):
            img, pl = b["data"][j, 0], b["pseudo_target"][j, 0]
            inside = img > 9.5  # away from the padding
            agree += int((torch.round(img - 10)[inside] == pl[inside].float()).sum())
            total += int(inside.sum())
            stored = torch.from_numpy(_pl({**UNLABELED, **SIBLING}[str(b["keys"][j])])[int(b["slice_index"][j])])
            differs += int(not torch.equal(pl.long(), stored.long()))
    assert total > 0 and agree / total > 0.95
    assert differs > 0  # the transforms did move the pseudo-labels


def test_missing_pseudo_label_is_a_clear_error(synth, tmp_path):
    store = PseudoLabelStore(str(tmp_path / "pl"))
    store.begin(1, {})
    store.write_case(1, "volD", _pl(6), _conf(6))
    store.write_manifest(1, {"round": 1, "state": {}, "complete": True})
    with pytest.raises(ValueError, match="volE"):
        _loader({**synth, "store": store}, None)
