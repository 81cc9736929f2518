"""Real-data acceptance test: MSD hippocampus -> convert-msd -> plan/preprocess -> select-labeled -> training batches
whose slice positions, partitions and meta-labels are checked against the source volumes.

Setup: an MSD-layout subset of the shared Task04_Hippocampus folder (the first 12 cases: symlinked imagesTr /
labelsTr files and the real dataset.json with numTraining = 12), then nnU-Net's and our CLIs, then an in-process
nnUNetTrainerFewLabels (fold 0) and `build_semi_dataloaders(sampling="partition", num_partitions=3)`.

Coordinates. nnU-Net reads the NIfTI files with SimpleITKIO: array axes (z, y, x) of
`sitk.GetArrayFromImage`, then permuted by the plans' `transpose_forward` ([0, 1, 2] for hippocampus: isotropic
1 mm spacing), and the 2d configuration slices axis 0 of the permuted array. The test reads the source volumes the
same way and checks that, for every sampled row, the batch's slice index addresses that axis of the ORIGINAL
volume: the image slice (nnU-Net's z-score of the volume cropped to its nonzero box) and, for labeled rows, the label
slice at that index equal the loaded patch pixel for pixel (augmentation off; the in-plane crop window is located
from the zero padding), num_slices / position / partition (floor(i * 3 / n), written out as a hand rule) /
patient ids (rank of the case id among the dataset's cases, MSD: patient = case) follow from the source alone, and
labeled flags match the fold's selected subset in splits_final.json. A second pass keeps nnU-Net's own training
augmentation and checks the bookkeeping plus "the labels in the augmented target occur in the source slice".

Crop. None of the 200 shared hippocampus volumes has a zero border, so nnU-Net's crop to the nonzero region never
moves their slice axis (bbox_used_for_cropping starts at 0) and a lost crop offset would go unnoticed on them. So
4 of the 12 cases (`CROPPED`) are written as modified copies of the shared images with a few label-free leading /
trailing slices (and, for one, rows) set to 0: nnU-Net then crops them, and they are checked against those copies
(the files convert-msd was given); the other 8 are checked against the untouched shared files.
`test_check_detects_a_lost_crop_offset` shows that the check fails when the crop offset is dropped.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import cli_env, run_cli

pytestmark = pytest.mark.slow

DATASET_ID = 941
NUM_CASES = 12
K = 3
# case -> (zeroed leading slices, zeroed trailing slices, zeroed leading rows) of the image, along nnU-Net's axes
CROPPED = {
    "hippocampus_015": (3, 2, 2),   # labeled in fold 0 (seed 0)
    "hippocampus_003": (2, 0, 0),   # unlabeled training case
    "hippocampus_020": (0, 3, 0),   # unlabeled: only the end is cropped (offset 0)
    "hippocampus_006": (2, 0, 0),   # validation case
}


def _read(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _nonzero_box(img):
    """[(lo, hi)] per axis of the nonzero region (nnU-Net fills holes of the mask, which does not move the box)."""
    nz = np.argwhere(img != 0)
    return [(int(a), int(b) + 1) for a, b in zip(nz.min(0), nz.max(0))]


@pytest.fixture(scope="module")
def hippo(hippocampus_dir, tmp_path_factory):
    import SimpleITK as sitk

    from nnunet_contrastive.prep.pipeline import nnunet_folders

    root = tmp_path_factory.mktemp("hippo")
    src = root / "Task04_Hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (src / sub).mkdir(parents=True)
    all_cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(hippocampus_dir, "imagesTr"))
                       if f.endswith(".nii.gz") and not f.startswith("."))
    cases = all_cases[:NUM_CASES]
    assert set(CROPPED) <= set(cases), "the shared hippocampus folder is not the expected MSD subset"
    for c in cases:
        for sub in ("imagesTr", "labelsTr"):
            shared = os.path.join(hippocampus_dir, sub, f"{c}.nii.gz")
            if sub == "imagesTr" and c in CROPPED:
                lead, trail, rows = CROPPED[c]
                img = sitk.ReadImage(shared)
                arr = sitk.GetArrayFromImage(img)
                lab = _read(os.path.join(hippocampus_dir, "labelsTr", f"{c}.nii.gz"))
                assert _nonzero_box(arr) == [(0, s) for s in arr.shape]  # the shared volume has no zero border
                zero = np.zeros(arr.shape, bool)
                zero[:lead] = True
                zero[arr.shape[0] - trail:] = True
                zero[:, :rows] = True
                assert not lab[zero].any(), f"{c}: zeroed voxels would hide labels"
                arr[zero] = 0
                out = sitk.GetImageFromArray(arr)
                out.CopyInformation(img)
                sitk.WriteImage(out, str(src / sub / f"{c}.nii.gz"))
            else:
                os.symlink(shared, src / sub / f"{c}.nii.gz")
    with open(os.path.join(hippocampus_dir, "dataset.json")) as f:
        dj = json.load(f)
    dj["numTraining"] = NUM_CASES
    (src / "dataset.json").write_text(json.dumps(dj, indent=1))

    folders = nnunet_folders(str(root / "nnunet"))
    env = cli_env(folders)
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # 2.8.1 planner: set_num_threads(0)
    run_cli(["nnunet-contrastive", "convert-msd", str(src), "-d", DATASET_ID], env)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "-np", "2", "-npfp", "2"], plan_env)
    run_cli(["nnunet-contrastive", "select-labeled", "-d", DATASET_ID, "--num-labeled", "2", "--seed", "0"], env)
    pre = os.path.join(folders["nnUNet_preprocessed"], f"Dataset{DATASET_ID}_Hippocampus")
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    assert plans["image_reader_writer"] == "SimpleITKIO"
    tf = plans["transpose_forward"]
    # source volumes in nnU-Net's axis order (the shared files, or the zeroed copies given to convert-msd)
    source = {}
    for c in cases:
        img_path = str(src / "imagesTr" / f"{c}.nii.gz") if c in CROPPED else \
            os.path.join(hippocampus_dir, "imagesTr", f"{c}.nii.gz")
        img = _read(img_path).transpose(tf)
        lab = _read(os.path.join(hippocampus_dir, "labelsTr", f"{c}.nii.gz")).transpose(tf)
        assert img.shape == lab.shape
        box = _nonzero_box(img)
        crop = tuple(slice(a, b) for a, b in box)
        vol = img[crop].astype(np.float64)
        source[c] = dict(img=img, lab=lab, box=box, mean=vol.mean(), std=vol.std())
    with open(os.path.join(pre, "splits_final.json")) as f:
        split0 = json.load(f)[0]
    return dict(folders=folders, pre=pre, plans=plans, cases=cases, source=source, split0=split0)


def _trainer(hippo, monkeypatch, tmp_path):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_contrastive.trainers import nnUNetTrainerFewLabels

    for k, v in hippo["folders"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    plans = json.loads(json.dumps(hippo["plans"]))
    plans["continue_training"] = False
    return nnUNetTrainerFewLabels(plans, "2d", 0, load_json(os.path.join(hippo["pre"], "dataset.json")),
                                  device=torch.device("cpu"))


def _loaders(hippo, monkeypatch, tmp_path):
    from nnunet_contrastive.data.dataloading import build_semi_dataloaders

    tr = _trainer(hippo, monkeypatch, tmp_path)
    tl, vl = build_semi_dataloaders(tr, sampling="partition", num_labeled=6, num_unlabeled=6, num_partitions=K,
                                    start=False)
    return tr, tl, vl


def _hand_partition(i, n, k):
    # partition p holds the original slices i with p*n <= i*k < (p+1)*n
    return next(p for p in range(k) if p * n <= i * k < (p + 1) * n)


def _locate(data, expect):
    """Offset (oy, ox) of the source slice's origin in the loaded window (the window shows expect[y+oy, x+ox] at
    (y, x); the rest is nnU-Net's zero padding), or None if no placement reproduces `data`."""
    offsets = []
    for ax in (0, 1):
        n_win, n_src = data.shape[ax], expect.shape[ax]
        filled = np.nonzero((data != 0).any(axis=1 - ax))[0]
        if filled.size == 0:
            return None
        lo, hi = filled[0], filled[-1] + 1
        if lo > 0:
            offsets.append([-lo])
        elif hi < n_win:
            offsets.append([n_src - hi])
        else:
            offsets.append(list(range(0, n_src - n_win + 1)))
    for oy in offsets[0]:
        for ox in offsets[1]:
            if np.allclose(_window(expect, oy, ox, data.shape, 0.0), data, atol=2e-3):
                return oy, ox
    return None


def _window(arr, oy, ox, shape, fill):
    out = np.full(shape, fill, dtype=np.float64)
    ys, xs = max(0, -oy), max(0, -ox)
    ye, xe = min(shape[0], arr.shape[0] - oy), min(shape[1], arr.shape[1] - ox)
    if ye > ys and xe > xs:
        out[ys:ye, xs:xe] = arr[ys + oy:ye + oy, xs + ox:xe + ox]
    return out


def _check_bookkeeping(hippo, b):
    """Everything but the pixels: index range, num_slices, position, partition, meta-labels, labeled flags."""
    split0 = hippo["split0"]
    labeled_set = set(split0["labeled"])
    unlabeled_set = set(split0["train"]) - labeled_set
    rank = {c: r for r, c in enumerate(sorted(hippo["cases"]))}
    keys = [str(k) for k in b["keys"]]
    flags = b["labeled"].tolist()
    assert flags == [True] * 6 + [False] * 6
    # volume-major rows: 2 labeled volumes (the whole subset) x 3 partitions, then 2 unlabeled volumes x 3
    assert all(keys[v * K:(v + 1) * K] == [keys[v * K]] * K for v in range(4))
    assert set(keys[:6]) == labeled_set and set(keys[6:]) <= unlabeled_set and len(set(keys[6:])) == 2
    assert b["partition"].tolist() == [0, 1, 2] * 4
    assert b["meta_label_names"] == ["patient"]
    assert b["meta_labels"].tolist() == [[rank[c]] for c in keys]
    ids = {c: int(m) for c, m in zip(keys, b["meta_labels"][:, 0])}
    assert len(set(ids.values())) == len(ids)  # different cases, different patients
    for j, c in enumerate(keys):
        s = hippo["source"][c]
        n = s["img"].shape[0]
        i = int(b["slice_index"][j])
        (z0, z1) = s["box"][0]
        assert z0 <= i < z1, (c, i, s["box"])  # a slice that nnU-Net's crop kept
        assert int(b["num_slices"][j]) == n
        assert float(b["position"][j]) == pytest.approx(i / (n - 1), abs=1e-6)
        assert int(b["partition"][j]) == _hand_partition(i, n, K)
    return keys


def _check_pixels(hippo, b):
    """Un-augmented batch: image and label patches equal the source slices at the reported original index."""
    keys = [str(k) for k in b["keys"]]
    for j, c in enumerate(keys):
        s = hippo["source"][c]
        i = int(b["slice_index"][j])
        (y0, y1), (x0, x1) = s["box"][1], s["box"][2]
        img_slice = s["img"][i, y0:y1, x0:x1].astype(np.float64)
        expect = (img_slice - s["mean"]) / s["std"]
        data = b["data"][j, 0].numpy().astype(np.float64)
        where = _locate(data, expect)
        assert where is not None, f"{c}: the image patch is not slice {i} of the source volume"
        tgt = b["target"][j, 0].numpy()
        if not b["labeled"][j]:
            assert (tgt == -1).all(), f"{c}: an unlabeled row carries a label"
            continue
        lab = _window(s["lab"][i, y0:y1, x0:x1], *where, tgt.shape, -1)
        zero = _window((img_slice == 0).astype(np.float64), *where, tgt.shape, 1) > 0
        # nnU-Net marks background outside the (hole-filled) nonzero mask with -1; it pads with -1 as well
        ok = (tgt == lab) | ((tgt == -1) & (lab <= 0) & zero)
        assert ok.all(), f"{c}: the label patch is not slice {i} of the source label volume"
        oy, ox = where
        if oy <= 0 and ox <= 0 and tgt.shape[0] + oy >= y1 - y0 and tgt.shape[1] + ox >= x1 - x0:
            # the window holds the whole slice: its labels are exactly those of the source slice
            assert set(np.unique(tgt[tgt > 0]).tolist()) == set(np.unique(s["lab"][i]).tolist()) - {0}, (c, i)


def _exact_batches(hippo, monkeypatch, tmp_path, n_batches=6, seed=0):
    tr, tl, vl = _loaders(hippo, monkeypatch, tmp_path)
    assert sorted(tr.labeled_keys) == sorted(hippo["split0"]["labeled"])
    tl.transforms = None  # no augmentation: patches are crops of the preprocessed slices
    np.random.seed(seed)
    torch.manual_seed(seed)
    seen = set()
    for _ in range(n_batches):
        b = next(tl)
        assert b["data"].shape[0] == 12 and b["target"].shape == (12, 1, *b["data"].shape[2:])
        seen |= set(_check_bookkeeping(hippo, b))
        _check_pixels(hippo, b)
    return seen, tl, vl


def test_preprocessing_kept_the_source_geometry(hippo):
    """What the pixel check relies on: no resampling (1 mm, 2d spacing [1, 1]), the crop box of every case is its
    nonzero box, and the zeroed copies really are cropped along the slice axis."""
    import pickle

    cfg = hippo["plans"]["configurations"]["2d"]
    assert cfg["spacing"] == [1.0, 1.0] and cfg["use_mask_for_norm"] == [False]
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"]
    for c in hippo["cases"]:
        with open(os.path.join(hippo["pre"], cfg["data_identifier"], f"{c}.pkl"), "rb") as f:
            props = pickle.load(f)
        s = hippo["source"][c]
        assert tuple(props["shape_before_cropping"]) == s["img"].shape
        assert [list(map(int, x)) for x in props["bbox_used_for_cropping"]] == [list(x) for x in s["box"]]
        lead = CROPPED.get(c, (0, 0, 0))[0]
        assert s["box"][0][0] == lead


def test_training_batches_match_source_volumes(hippo, monkeypatch, tmp_path):
    seen, _, vl = _exact_batches(hippo, monkeypatch, tmp_path)
    # every cropped training case was checked (the labeled one is in every batch)
    train = set(hippo["split0"]["train"])
    assert {c for c in CROPPED if c in train} <= seen
    # validation loader (labeled, random sampling, one view), un-augmented: same checks
    vl.transforms = None
    v = next(vl)
    vkeys = [str(k) for k in v["keys"]]
    assert set(vkeys) <= set(hippo["split0"]["val"]) and v["labeled"].all()
    for j, c in enumerate(vkeys):
        s = hippo["source"][c]
        n, i = s["img"].shape[0], int(v["slice_index"][j])
        assert int(v["num_slices"][j]) == n and int(v["partition"][j]) == _hand_partition(i, n, K)
    _check_pixels(hippo, v)


def test_augmented_training_batches_keep_their_bookkeeping(hippo, monkeypatch, tmp_path):
    """nnU-Net's own training transforms (rotation, scaling, mirroring, deep supervision): slice bookkeeping as
    above, and every label in a labeled row's augmented target occurs in the source slice at the reported index."""
    _, tl, _ = _loaders(hippo, monkeypatch, tmp_path)
    np.random.seed(1)
    torch.manual_seed(1)
    fg_rows = 0
    for _ in range(3):
        b = next(tl)
        assert isinstance(b["target"], list)
        keys = _check_bookkeeping(hippo, b)
        for j, c in enumerate(keys):
            if not b["labeled"][j]:
                assert all((t[j] == -1).all() for t in b["target"]), c
                continue
            i = int(b["slice_index"][j])
            got = set(np.unique(b["target"][0][j].numpy()).tolist()) - {0}
            assert got <= set(np.unique(hippo["source"][c]["lab"][i]).tolist()) - {0}, (c, i, got)
            fg_rows += bool(got)
    assert fg_rows > 0


def test_check_detects_a_lost_crop_offset(hippo, monkeypatch, tmp_path):
    """The check has power: with nnU-Net's crop offset ignored, the indices of the cropped cases are off by their
    zeroed leading slices and the pixel comparison fails."""
    import nnunet_contrastive.data.slices as S

    monkeypatch.setattr(S, "crop_offset", lambda props: 0)
    shifted = [c for c, (lead, _, _) in CROPPED.items() if lead > 0]
    with pytest.raises(AssertionError, match="|".join(shifted)):
        _exact_batches(hippo, monkeypatch, tmp_path, n_batches=3)
