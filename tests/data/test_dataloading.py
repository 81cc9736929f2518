"""Slice-aware 2D loader (nnunet_contrastive.data.dataloading).

Fast tests use a hand-written preprocessed dataset in nnU-Net's blosc2 format whose image value at every pixel of a
slice encodes that slice's ORIGINAL index (value = 100 * original index + pixel row / 100), so a loaded patch tells
which slice it came from independently of the loader's bookkeeping. Slow tests preprocess a phantom with nnU-Net
and compare batches with the source NIfTI volumes.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_contrastive.data.dataloading import SliceAwareDataLoader, SharedParamsTransform, share_spatial_parameters
from nnunet_contrastive.data.metadata import MetadataTable

LABELS = {"background": 0, "a": 1, "b": 2}
# case -> (original slices n, first kept slice c0, kept slices z)
CASES = {
    "volA": (10, 2, 7),   # original slices 2..8 kept
    "volB": (9, 0, 9),
    "volC": (12, 1, 10),
    "volD": (6, 0, 6),
    "volE": (7, 0, 7),
    "volF": (11, 3, 8),
}
LABELED = ["volA", "volB", "volC"]
UNLABELED_SAME_FOLDER = ["volD"]     # labeled-folder cases flagged unlabeled
UNLABELED_SIBLING = ["volE", "volF"]  # a `<data_identifier>_unlabeled` folder
SIZE = 16


def _case_arrays(n, c0, z):
    data = np.zeros((1, z, SIZE, SIZE), np.float32)
    seg = np.zeros((1, z, SIZE, SIZE), np.int16)
    rows = np.arange(SIZE, dtype=np.float32)[:, None] / 100.0
    for k in range(z):
        orig = c0 + k
        data[0, k] = 100.0 * orig + rows
        seg[0, k, 2:9, 3:6] = 1      # an asymmetric L: mirroring or rotating it changes the mask
        seg[0, k, 7:9, 6:12] = 2
    return data, seg


def _write_case(folder, case, n, c0, z):
    data, seg = _case_arrays(n, c0, z)
    props = {
        "shape_before_cropping": (n, SIZE, SIZE),
        "bbox_used_for_cropping": [[c0, c0 + z], [0, SIZE], [0, SIZE]],
        "shape_after_cropping_and_before_resampling": (z, SIZE, SIZE),
        "spacing": [5.0, 1.0, 1.0],
        "class_locations": {c: np.argwhere(seg == c) for c in (1, 2)},
    }
    nnUNetDatasetBlosc2.save_case(data, seg, props, os.path.join(folder, case), chunks=(1, 1, SIZE, SIZE),
                                  blocks=(1, 1, SIZE, SIZE))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    lab = root / "nnUNetPlans_2d"
    unl = root / "nnUNetPlans_2d_unlabeled"
    lab.mkdir()
    unl.mkdir()
    for case in LABELED + UNLABELED_SAME_FOLDER:
        _write_case(str(lab), case, *CASES[case])
    for case in UNLABELED_SIBLING:
        _write_case(str(unl), case, *CASES[case])
    rows = {c: {"patient": f"p{c[-1]}", "site": "s1" if c in ("volA", "volE") else "s0"} for c in CASES}
    meta = MetadataTable(columns=["patient", "site"], rows=rows, meta_label_columns=["patient", "site"])
    return {"root": str(root), "labeled": str(lab), "unlabeled": str(unl), "meta": meta}


def _loader(folder_lab, folder_unl, batch_size=6, **kw):
    lm = LabelManager(LABELS, None)
    ds = nnUNetDatasetBlosc2(folder_lab, list(LABELED))
    unlabeled = []
    if kw.get("num_unlabeled", 0):
        unlabeled = [nnUNetDatasetBlosc2(folder_lab, list(UNLABELED_SAME_FOLDER)),
                     nnUNetDatasetBlosc2(folder_unl, list(UNLABELED_SIBLING))]
    patch = kw.pop("patch", (SIZE, SIZE))
    kw.setdefault("oversample_foreground_percent", 0.33)
    return SliceAwareDataLoader(ds, batch_size, patch, patch, lm, unlabeled=unlabeled, **kw)


def _decoded_orig_index(batch_data):
    """(B,) original slice index encoded in the image (value = 100 * index + row/100; padding is 0)."""
    return torch.round(batch_data[:, 0].amax(dim=(1, 2)) / 100.0).long()


def _expected_partition(idx, n, k):
    # hand rule from the module docstring, written out independently: partition p holds i with p*n <= i*k < (p+1)*n
    return [next(p for p in range(k) if p * nn <= i * k < (p + 1) * nn) for i, nn in zip(idx, n)]


# ------------------------------------------------------------------------------------------------ fast tests
@pytest.mark.parametrize("sampling", ["random", "partition"])
def test_batch_slice_bookkeeping_matches_image_content(synth, sampling):
    np.random.seed(0)
    dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=6, sampling=sampling, num_partitions=3,
                 metadata=synth["meta"])
    seen_partitions = set()
    for _ in range(15):
        b = next(dl)
        assert b["data"].shape == (6, 1, SIZE, SIZE) and b["target"].shape == (6, 1, SIZE, SIZE)
        idx = b["slice_index"].tolist()
        assert _decoded_orig_index(b["data"]).tolist() == idx
        n = [CASES[k][0] for k in b["keys"]]
        assert b["num_slices"].tolist() == n
        assert b["partition"].tolist() == _expected_partition(idx, n, 3)
        np.testing.assert_allclose(b["position"].numpy(), [i / (m - 1) for i, m in zip(idx, n)], rtol=1e-6)
        for k, i in zip(b["keys"], idx):  # only slices kept by the crop
            assert CASES[k][1] <= i < CASES[k][1] + CASES[k][2]
        # meta-labels: patient ids rank the sorted patient names pA..pF, site s0 -> 0, s1 -> 1
        assert b["meta_label_names"] == ["patient", "site"]
        expect = [["ABCDEF".index(k[-1]), 1 if k in ("volA", "volE") else 0] for k in b["keys"]]
        assert b["meta_labels"].tolist() == expect and b["meta_labels"].dtype == torch.int64
        assert b["labeled"].all()
        if sampling == "partition":
            keys = list(b["keys"])
            assert keys[0:3] == [keys[0]] * 3 and keys[3:6] == [keys[3]] * 3 and keys[0] != keys[3]
            assert b["partition"].tolist() == [0, 1, 2, 0, 1, 2]
        seen_partitions |= set(zip(b["keys"].tolist(), idx))
    if sampling == "partition":
        # volA: n=10, kept 2..8 -> partition 0 may only give 2 or 3 (0, 1 were cropped away)
        a0 = {i for k, i in seen_partitions if k == "volA" and i < 4}
        assert a0 and a0 <= {2, 3}


def test_partition_sampling_is_uniform_within_partition(synth):
    np.random.seed(1)
    dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=3, sampling="partition", num_partitions=3,
                 oversample_foreground_percent=0.0)
    counts = {}
    for _ in range(300):
        b = next(dl)
        for k, i in zip(b["keys"], b["slice_index"].tolist()):
            counts[(k, i)] = counts.get((k, i), 0) + 1
    # volC: n=12, kept 1..10, partitions [0,4) [4,8) [8,12) -> reachable {1,2,3}, {4..7}, {8,9,10}
    c = {i: v for (k, i), v in counts.items() if k == "volC"}
    assert set(c) == set(range(1, 11))
    p1 = np.array([c[i] for i in range(4, 8)])
    assert p1.min() > 0.5 * p1.mean()


def test_foreground_oversampling_still_applies(synth):
    """nnU-Net's rule (last round(p*B) labeled samples centred on foreground) is kept; 4x4 crops of a 16x16 slice
    mostly miss the foreground without it."""
    def fg_fraction(p):
        np.random.seed(2)
        dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=3, patch=(4, 4), oversample_foreground_percent=p)
        hits = [bool((t > 0).any()) for _ in range(15) for t in next(dl)["target"]]
        return np.mean(hits)

    assert fg_fraction(1.0) == 1.0
    assert fg_fraction(0.0) < 0.8


def test_mixed_batches_never_read_unlabeled_segmentations(synth, tmp_path):
    """Corrupting, then deleting, the seg files of unlabeled cases changes nothing."""
    kw = dict(batch_size=5, num_unlabeled=3, sampling="random", metadata=synth["meta"])

    def batches(lab, unl, n=6):
        np.random.seed(3)
        torch.manual_seed(3)
        dl = _loader(lab, unl, **kw)
        return [next(dl) for _ in range(n)]

    ref = batches(synth["labeled"], synth["unlabeled"])
    for b in ref:
        assert b["labeled"].tolist() == [True, True, False, False, False]
        assert set(b["keys"][:2]) <= set(LABELED)
        assert set(b["keys"][2:]) <= set(UNLABELED_SAME_FOLDER + UNLABELED_SIBLING)
        assert (b["target"][2:] == -1).all() and (b["target"][:2] >= 0).all()
        assert _decoded_orig_index(b["data"]).tolist() == b["slice_index"].tolist()
    assert {k for b in ref for k in b["keys"][2:]} == set(UNLABELED_SAME_FOLDER + UNLABELED_SIBLING)

    lab, unl = tmp_path / "lab", tmp_path / "unl"
    shutil.copytree(synth["labeled"], lab)
    shutil.copytree(synth["unlabeled"], unl)
    segs = [lab / f"{c}_seg.b2nd" for c in UNLABELED_SAME_FOLDER] + [unl / f"{c}_seg.b2nd" for c in UNLABELED_SIBLING]
    for f in segs:
        f.write_bytes(b"not a blosc2 file")
    corrupted = batches(str(lab), str(unl))
    for f in segs:
        f.unlink()
    deleted = batches(str(lab), str(unl))
    for other in (corrupted, deleted):
        for a, b in zip(ref, other):
            assert list(a["keys"]) == list(b["keys"])
            for key in ("data", "target", "slice_index", "partition", "meta_labels", "labeled"):
                assert torch.equal(a[key], b[key]), key
    # the check can fail: a labeled case with a corrupted seg file breaks loading
    (lab / "volA_seg.b2nd").write_bytes(b"not a blosc2 file")
    with pytest.raises(Exception):
        batches(str(lab), str(unl), n=20)


def test_mixed_partition_batches(synth):
    np.random.seed(4)
    dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=12, num_unlabeled=6, sampling="partition",
                 num_partitions=3)
    b = next(dl)
    assert b["labeled"].tolist() == [True] * 6 + [False] * 6
    assert b["partition"].tolist() == [0, 1, 2] * 4
    assert len(set(b["keys"][6:].tolist())) == 2  # two distinct unlabeled volumes


def _nnunet_transforms(patch, deep_supervision=True):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer.get_training_transforms(
        patch, (-np.pi, np.pi), [[1.0, 1.0], [0.5, 0.5]] if deep_supervision else None, (0, 1), False,
        use_mask_for_norm=[False], is_cascaded=False, foreground_labels=[1, 2], regions=None, ignore_label=None)


def test_two_views_independent_vs_shared_spatial(synth):
    patch = (SIZE, SIZE)
    differs_indep = differs_shared_img = 0
    for share in (False, True):
        np.random.seed(5)
        torch.manual_seed(5)
        dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=4, patch=patch, two_views=True,
                     share_spatial=share, transforms=_nnunet_transforms(patch))
        for _ in range(10):
            b = next(dl)
            assert b["data_view2"].shape == b["data"].shape
            assert isinstance(b["target_view2"], list) and len(b["target_view2"]) == 2
            for s in range(2):
                assert b["target_view2"][s].shape == b["target"][s].shape
            same_t = [torch.equal(b["target"][0][j], b["target_view2"][0][j]) for j in range(4)]
            if share:
                assert all(same_t)
                assert all(torch.equal(b["target"][1][j], b["target_view2"][1][j]) for j in range(4))
                differs_shared_img += sum(not torch.equal(b["data"][j], b["data_view2"][j]) for j in range(4))
            else:
                differs_indep += sum(not s for s in same_t)
    assert differs_indep > 0          # independent views: flips/rotations differ somewhere
    assert differs_shared_img > 0     # shared spatial: intensity augmentations still independent


def test_shared_spatial_only_pipeline_gives_identical_views(synth):
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    spatial = ComposeTransforms([
        RandomTransform(SpatialTransform((SIZE, SIZE), 0, False, p_rotation=1.0, rotation=(-3, 3), p_scaling=0.5,
                                         scaling=(0.7, 1.4)), apply_probability=0.7),
        MirrorTransform((0, 1))])
    np.random.seed(6)
    torch.manual_seed(6)
    dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=4, two_views=True, share_spatial=True,
                 transforms=spatial)
    outs = []
    for _ in range(5):
        b = next(dl)
        assert torch.equal(b["data"], b["data_view2"]) and torch.equal(b["target"], b["target_view2"])
        outs.append(b["target"])
    # parameters are replayed within a sample only: different samples still get different transforms
    flat = torch.cat(outs).flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) > 3


def test_shared_params_wrapper_record_replay():
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    pipe, wrappers = share_spatial_parameters(ComposeTransforms([MirrorTransform((0, 1))]))
    assert len(wrappers) == 1 and isinstance(wrappers[0], SharedParamsTransform)
    img = torch.arange(16.).reshape(1, 4, 4)
    torch.manual_seed(0)
    for _ in range(10):
        wrappers[0].mode = "record"
        a = pipe(image=img.clone())["image"]
        wrappers[0].mode = "replay"
        assert torch.equal(pipe(image=img.clone())["image"], a)
    wrappers[0].mode = "free"
    results = {tuple(pipe(image=img.clone())["image"].flatten().tolist()) for _ in range(20)}
    assert len(results) > 1


def test_unlabeled_targets_after_nnunet_transforms_are_filled(synth):
    patch = (SIZE, SIZE)
    np.random.seed(7)
    dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=4, num_unlabeled=2, patch=patch,
                 transforms=_nnunet_transforms(patch), two_views=True)
    b = next(dl)
    for t in list(b["target"]) + list(b["target_view2"]):
        assert (t[2:] == -1).all() and (t[:2] >= 0).all()
    dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=4, num_unlabeled=2, unlabeled_target_value=0)
    assert (next(dl)["target"][2:] == 0).all()


def test_unlabeled_segmentation_input_is_the_nonzero_mask_of_the_image(synth):
    """The seg handed to the transforms for unlabeled samples: -1 where the image is 0 (padding / outside the
    nonzero region), 0 elsewhere; labeled samples get their real seg."""
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

    class ShowSeg(BasicTransform):
        def __call__(self, **d):
            return {"image": torch.cat([d["image"], d["segmentation"].float()]), "segmentation": d["segmentation"]}

    np.random.seed(8)
    dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=4, num_unlabeled=2, patch=(20, 20),
                 transforms=ShowSeg())
    for _ in range(3):
        b = next(dl)
        img, seg_in = b["data"][:, 0], b["data"][:, 1]
        assert torch.equal(seg_in[2:] == -1, img[2:] == 0)
        assert (seg_in[2:] == -1).any()  # 20x20 patches of 16x16 slices are padded
        assert (seg_in[:2] > 0).any()     # labeled: the real label map


def test_clear_errors(synth, tmp_path):
    with pytest.raises(ValueError, match="multiple of num_partitions=3"):
        _loader(synth["labeled"], synth["unlabeled"], batch_size=4, sampling="partition")
    with pytest.raises(ValueError, match="distinct labeled volumes"):
        _loader(synth["labeled"], synth["unlabeled"], batch_size=12, sampling="partition")
    with pytest.raises(ValueError, match="no unlabeled cases"):
        SliceAwareDataLoader(nnUNetDatasetBlosc2(synth["labeled"], list(LABELED)), 4, (16, 16), (16, 16),
                             LabelManager(LABELS, None), num_unlabeled=2)
    with pytest.raises(ValueError, match="2d"):
        _loader(synth["labeled"], synth["unlabeled"], patch=(4, 16, 16))
    with pytest.raises(ValueError, match="sampling"):
        _loader(synth["labeled"], synth["unlabeled"], sampling="volume")
    # a volume with fewer slices than partitions, named
    thin = tmp_path / "thin"
    thin.mkdir()
    _write_case(str(thin), "thinvol", 2, 0, 2)
    with pytest.raises(ValueError, match="case 'thinvol' has 2 slice"):
        SliceAwareDataLoader(nnUNetDatasetBlosc2(str(thin), ["thinvol"]), 2, (16, 16), (16, 16),
                             LabelManager(LABELS, None), num_partitions=3)
    # a partition removed entirely by nnU-Net's crop
    _write_case(str(thin), "cropped", 12, 0, 4)
    with pytest.raises(ValueError, match="case 'cropped': partition 1"):
        SliceAwareDataLoader(nnUNetDatasetBlosc2(str(thin), ["cropped"]), 3, (16, 16), (16, 16),
                             LabelManager(LABELS, None), sampling="partition", num_partitions=3)
    # meta-labels: every case needs a row
    meta = MetadataTable(columns=["patient"], rows={"volA": {"patient": "x"}})
    with pytest.raises(ValueError, match="no metadata row"):
        _loader(synth["labeled"], synth["unlabeled"], metadata=meta)


# batchgenerators' NonDetMultiThreadedAugmenter._finish can race its own results thread (a batch in flight whose
# worker has exited); that is teardown noise of the augmenter, not of the loader
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("workers", [0, 2])
def test_nnunet_augmenters_carry_the_extra_entries(synth, workers):
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    dl = _loader(synth["labeled"], synth["unlabeled"], batch_size=6, num_unlabeled=3, sampling="partition",
                 two_views=True, metadata=synth["meta"])
    if workers == 0:
        aug = SingleThreadedAugmenter(dl, None)
    else:
        aug = NonDetMultiThreadedAugmenter(dl, None, num_processes=workers, num_cached=2, seeds=None,
                                           pin_memory=False, wait_time=0.002)
    try:
        seen = set()
        for _ in range(4):
            b = next(aug)
            assert isinstance(b["keys"], np.ndarray) and b["meta_label_names"] == ["patient", "site"]
            assert b["labeled"].dtype == torch.bool and b["labeled"].tolist() == [True] * 3 + [False] * 3
            assert b["meta_labels"].shape == (6, 2)
            assert _decoded_orig_index(b["data"]).tolist() == b["slice_index"].tolist()
            assert _decoded_orig_index(b["data_view2"]).tolist() == b["slice_index"].tolist()
            seen.add(tuple(b["slice_index"].tolist()))
        assert len(seen) > 1
    finally:
        if workers:
            aug._finish()


# ------------------------------------------------------------------------------------------------ slow: nnU-Net
PHANTOM_ID = 987
ZEROED = ("patient001_ED", 2)  # the first 2 slices of this case are zeroed -> nnU-Net crops them away


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    import SimpleITK as sitk

    from nnunet_contrastive.data.metadata import copy_metadata
    from nnunet_contrastive.prep.phantom import generate_phantom_dataset
    from nnunet_contrastive.prep.pipeline import nnunet_folders, plan_and_preprocess, small_machine_env

    folders = nnunet_folders(str(tmp_path_factory.mktemp("phantom_nnunet")))
    raw = generate_phantom_dataset(folders["nnUNet_raw"], PHANTOM_ID, num_train_patients=3, num_test_patients=0,
                                   size=32)
    case, nz = ZEROED
    for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
        path = os.path.join(raw, sub, name)
        img = sitk.ReadImage(path)
        arr = sitk.GetArrayFromImage(img)
        arr[:nz] = 0
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, path)
    env = small_machine_env(dict(os.environ), **folders)
    plan_and_preprocess(PHANTOM_ID, env, log=lambda *a: None)
    pre = os.path.join(folders["nnUNet_preprocessed"], os.path.basename(raw))
    copy_metadata(raw, pre)
    src = {}
    for f in sorted(os.listdir(os.path.join(raw, "labelsTr"))):
        c = f[:-len(".nii.gz")]
        src[c] = (sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "imagesTr", f"{c}_0000.nii.gz"))),
                  sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "labelsTr", f))))
    return {"folders": folders, "raw": raw, "pre": pre, "src": src}


def _phantom_loader(phantom, **kw):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_contrastive.data.metadata import read_metadata
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(os.path.join(phantom["pre"], "nnUNetPlans.json"))
    dj = load_json(os.path.join(phantom["pre"], "dataset.json"))
    cm = pm.get_configuration("2d")
    folder = os.path.join(phantom["pre"], cm.data_identifier)
    ds = nnUNetDatasetBlosc2(folder, sorted(phantom["src"]))
    return SliceAwareDataLoader(ds, kw.pop("batch_size", 6), cm.patch_size, cm.patch_size, pm.get_label_manager(dj),
                                metadata=read_metadata(phantom["raw"], dj), **kw), cm


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["random", "partition"])
def test_phantom_batches_match_source_volumes(phantom, sampling):
    np.random.seed(10)
    dl, cm = _phantom_loader(phantom, sampling=sampling, num_partitions=3, oversample_foreground_percent=0.33)
    assert tuple(cm.patch_size) == (32, 32)  # whole slices, no crop offset in-plane
    hits_zeroed = []
    for _ in range(12):
        b = next(dl)
        assert b["meta_label_names"] == ["patient", "phase"]
        for j, case in enumerate(b["keys"]):
            img, lab = phantom["src"][case]
            n = img.shape[0]
            i = int(b["slice_index"][j])
            # the patch is the whole slice; a foreground-centred crop shifts it by (dy, dx) >= 0, padding the
            # bottom/right with -1 (nnU-Net's seg padding value)
            tgt = b["target"][j, 0].numpy()
            dy, dx = int((tgt == -1).all(1).sum()), int((tgt == -1).all(0).sum())
            h, w = tgt.shape[0] - dy, tgt.shape[1] - dx
            # the label slice at the reported ORIGINAL index equals the loaded target
            assert np.array_equal(lab[i][dy:, dx:], tgt[:h, :w]), (case, i, dy, dx)
            # image: nnU-Net's z-score of the cropped volume (the crop drops the zeroed slices)
            c0 = ZEROED[1] if case == ZEROED[0] else 0
            vol = img[c0:].astype(np.float64)
            expect = (img[i] - vol.mean()) / vol.std()
            np.testing.assert_allclose(b["data"][j, 0].numpy()[:h, :w], expect[dy:, dx:], atol=2e-3)
            assert int(b["num_slices"][j]) == n
            assert int(b["partition"][j]) == (i * 3) // n
            assert float(b["position"][j]) == pytest.approx(i / (n - 1), abs=1e-6)
            patient, phase = case.split("_")
            assert b["meta_labels"][j].tolist() == [int(patient[-3:]) - 1, ("ED", "ES").index(phase)]
            if case == ZEROED[0]:
                hits_zeroed.append(i)
    assert hits_zeroed and min(hits_zeroed) >= ZEROED[1]


def _trainer(phantom, fold=0):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_contrastive.trainers.base import nnUNetTrainerContrastiveBase

    plans = load_json(os.path.join(phantom["pre"], "nnUNetPlans.json"))
    plans["continue_training"] = False
    tr = nnUNetTrainerContrastiveBase(plans, "2d", fold, load_json(os.path.join(phantom["pre"], "dataset.json")),
                                      device=torch.device("cpu"))
    tr._set_batch_size_and_oversample()
    return tr


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("n_proc", ["0", "1"])
def test_build_semi_dataloaders_with_nnunet_trainer(phantom, tmp_path, monkeypatch, n_proc):
    """Labeled subset + unlabeled cases (simulated in the labeled folder, and a real `_unlabeled` sibling folder)
    whose seg files are deleted; nnU-Net's own transforms and augmenters."""
    from nnunet_contrastive.data.dataloading import build_semi_dataloaders
    from nnunet_contrastive.data.labeled import apply_selection, read_splits, write_splits
    from nnunet_contrastive.data.metadata import read_metadata, write_metadata

    pre_root = tmp_path / "pre"
    pre = pre_root / os.path.basename(phantom["pre"])
    shutil.copytree(phantom["pre"], pre)
    for k, v in phantom["folders"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_preprocessed", str(pre_root))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", n_proc)
    cases = sorted(phantom["src"])
    splits = [{"train": cases[:4], "val": cases[4:]}]
    write_splits(str(pre), apply_selection(splits, 2, seed=0))
    labeled = read_splits(str(pre))[0]["labeled"]
    unlabeled = [c for c in cases[:4] if c not in labeled]
    # a truly unlabeled case in the sibling folder (image + pkl only)
    ident = "nnUNetPlans_2d"
    (pre / f"{ident}_unlabeled").mkdir()
    for ext in (".b2nd", ".pkl"):
        shutil.copy(pre / ident / f"{cases[5]}{ext}", pre / f"{ident}_unlabeled" / f"extra900_ED{ext}")
    meta = read_metadata(str(pre))
    rows = dict(meta.rows)
    rows["extra900_ED"] = {"patient": "patient900", "phase": "ED"}
    write_metadata(str(pre), rows, meta.columns)
    # as a user does it: the raw table gets the new row too (`check` copies it); a copy that differs from its raw
    # table is refused as stale
    raw = tmp_path / "raw" / os.path.basename(phantom["raw"])
    shutil.copytree(phantom["raw"], raw)
    write_metadata(str(raw), rows, meta.columns)
    monkeypatch.setenv("nnUNet_raw", str(raw.parent))
    for c in unlabeled:
        os.remove(pre / ident / f"{c}_seg.b2nd")

    tr = _trainer(phantom)
    assert sorted(tr.do_split()[0]) == sorted(labeled)
    tl, vl = build_semi_dataloaders(tr, sampling="partition", num_labeled=3, num_unlabeled=3, num_partitions=3,
                                    two_views=True, share_spatial=True)
    try:
        ps = tr.configuration_manager.patch_size
        seen_unlabeled = set()
        for _ in range(4):
            b = next(tl)
            assert b["data"].shape == (6, 1, *ps) and b["data_view2"].shape == (6, 1, *ps)
            assert isinstance(b["target"], list) and b["target"][0].shape == (6, 1, *ps)
            assert b["labeled"].tolist() == [True] * 3 + [False] * 3
            assert set(b["keys"][:3]) <= set(labeled) and set(b["keys"][3:]) <= set(unlabeled) | {"extra900_ED"}
            assert b["partition"].tolist() == [0, 1, 2, 0, 1, 2]
            assert all((t[3:] == -1).all() and (t[:3] >= 0).all() for t in b["target"])
            assert all(torch.equal(a, c) for a, c in zip(b["target"], b["target_view2"]))
            assert b["meta_label_names"] == ["patient", "phase"]
            seen_unlabeled |= set(b["keys"][3:])
        assert seen_unlabeled
        v = next(vl)
        assert set(v["keys"]) <= set(cases[4:]) and v["labeled"].all() and "data_view2" not in v
    finally:
        for aug in (tl, vl):
            if hasattr(aug, "_finish"):
                aug._finish()
