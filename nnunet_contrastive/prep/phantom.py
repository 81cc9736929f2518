"""Deterministic cardiac-cine-like phantoms in nnU-Net raw format, with per-case metadata.

Each synthetic patient has two phases (ED, ES) of a short-axis stack of 8-12 slices (base to apex). In every
slice: a left-ventricle blood pool (label 3, bright) inside a myocardium ring (label 2, dark), a right-ventricle
cavity (label 1, bright) beside it, body tissue with a few random blobs, Rician-like noise and a smooth multiplicative
intensity inhomogeneity. The anatomy shrinks from base to apex, the RV vanishes towards the apex, the LV cavity is
larger at ED than at ES (the myocardium thickens at ES), and sizes, position, orientation, contrast and noise vary per
patient. Labels follow ACDC (1 RV, 2 MYO, 3 LV), metadata gives patient and phase (nnunet_contrastive.data.metadata).

Everything is a function of (seed, patient index): adding patients never changes the earlier ones.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from nnunet_contrastive.data.metadata import write_metadata

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
PHASES = ("ED", "ES")


@dataclass(frozen=True)
class PatientAnatomy:
    n_slices: int
    center: tuple[float, float]  # (y, x) in pixels, at the base
    drift: tuple[float, float]  # centre shift from base to apex, pixels
    lv_radius: float  # ED endocardial radius at the base, pixels
    wall: float  # ED myocardium thickness, pixels
    rv_scale: float  # RV size relative to LV
    angle: float  # RV direction around the LV, radians
    ejection: float  # ES/ED radius ratio of the LV cavity
    blood: float
    myo: float
    tissue: float
    noise: float
    bias: tuple[float, float, float]  # linear inhomogeneity coefficients (const, y, x)


def sample_anatomy(rng: np.random.Generator, size: int) -> PatientAnatomy:
    s = size / 64.0
    return PatientAnatomy(
        n_slices=int(rng.integers(8, 13)),
        center=(size / 2 + rng.uniform(-5, 5) * s, size / 2 + rng.uniform(-3, 7) * s),
        drift=(rng.uniform(-3, 3) * s, rng.uniform(-3, 3) * s),
        lv_radius=rng.uniform(8.0, 11.0) * s,
        wall=rng.uniform(3.0, 4.5) * s,
        rv_scale=rng.uniform(0.9, 1.25),
        angle=np.pi + rng.uniform(-0.5, 0.5),
        ejection=rng.uniform(0.6, 0.75),
        blood=rng.uniform(0.85, 1.0),
        myo=rng.uniform(0.25, 0.4),
        tissue=rng.uniform(0.45, 0.6),
        noise=rng.uniform(0.03, 0.07),
        bias=(1.0, rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)),
    )


def render_volume(anat: PatientAnatomy, phase: str, size: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32) and label (uint8) volumes of shape (n_slices, size, size), slice 0 = base."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    n = anat.n_slices
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.zeros((n, size, size), np.float32)
    label = np.zeros((n, size, size), np.uint8)
    # body: a large ellipse, fixed per patient; a few tissue blobs (other organs), fixed per patient and phase-free
    body = ((yy - size / 2) / (0.47 * size)) ** 2 + ((xx - size / 2) / (0.49 * size)) ** 2 <= 1.0
    blobs = []
    for _ in range(3):
        blobs.append((rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size, rng.uniform(3, 8) * size / 64,
                      rng.uniform(0.2, 0.8)))
    bias = (anat.bias[0] + anat.bias[1] * (yy / size - 0.5) + anat.bias[2] * (xx / size - 0.5)).astype(np.float32)
    es = phase == "ES"
    for z in range(n):
        t = z / max(n - 1, 1)  # 0 at the base, 1 at the apex
        shrink = 1.0 - 0.55 * t
        cy = anat.center[0] + anat.drift[0] * t
        cx = anat.center[1] + anat.drift[1] * t
        r_lv = anat.lv_radius * shrink * (anat.ejection if es else 1.0)
        wall = anat.wall * (1.0 - 0.3 * t) * (1.35 if es else 1.0)
        r_epi = r_lv + wall
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        lv = d <= r_lv
        myo = (d > r_lv) & (d <= r_epi)
        # RV: an ellipse beside the LV along `angle`, cut by the epicardium; vanishes towards the apex
        rv_size = anat.rv_scale * anat.lv_radius * (1.0 - 1.1 * t) * (0.75 if es else 1.0)
        rv = np.zeros_like(lv)
        if rv_size > 1.5:
            off = r_epi + 0.55 * rv_size
            ry, rx = cy + off * np.sin(anat.angle), cx + off * np.cos(anat.angle)
            ca, sa = np.cos(anat.angle), np.sin(anat.angle)
            u = (xx - rx) * ca + (yy - ry) * sa  # along the LV-RV axis
            v = -(xx - rx) * sa + (yy - ry) * ca
            rv = ((u / (0.6 * rv_size)) ** 2 + (v / (1.4 * rv_size)) ** 2 <= 1.0) & (d > r_epi + 0.8)
        img = np.where(body, anat.tissue, 0.02).astype(np.float32)
        for by, bx, br, bi in blobs:
            img[((yy - by) ** 2 + (xx - bx) ** 2 <= br ** 2) & body] = bi
        img[myo] = anat.myo
        img[rv] = anat.blood * 0.95
        img[lv] = anat.blood
        img = img * bias
        # Rician-like magnitude noise
        n1 = rng.normal(0, anat.noise, img.shape)
        n2 = rng.normal(0, anat.noise, img.shape)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)
        image[z] = (img * 1000.0).astype(np.float32)
        label[z][rv] = LABELS["RV"]
        label[z][myo] = LABELS["MYO"]
        label[z][lv] = LABELS["LV"]
    return image, label


def _write_nifti(array_zyx: np.ndarray, path: str, spacing_xyz: tuple[float, float, float]) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    sitk.WriteImage(img, path, useCompression=True)


def generate_phantom_dataset(raw_root: str, dataset_id: int = 990, name: str = "CardiacPhantom",
                             num_train_patients: int = 8, num_test_patients: int = 2,
                             num_unlabeled_patients: int = 0, size: int = 64, seed: int = 0,
                             spacing_xyz: tuple[float, float, float] = (1.5, 1.5, 8.0)) -> str:
    """Write `raw_root/DatasetXXX_name/` (imagesTr, labelsTr, imagesTs, labelsTs[, imagesUnlabeled]) and return it.

    Patients are numbered consecutively: train first, then test, then unlabeled; each contributes two cases
    `patientNNN_ED` and `patientNNN_ES`. `metadata.csv` covers train and unlabeled cases; `metadata_Ts.csv` the test
    cases. `dataset.json` declares `"meta_labels": ["patient", "phase"]`.
    """
    if num_train_patients < 1:
        raise ValueError(f"num_train_patients must be >= 1, got {num_train_patients}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    groups = [("Tr", num_train_patients, True), ("Ts", num_test_patients, True),
              ("Unlabeled", num_unlabeled_patients, False)]
    meta_tr: dict[str, dict[str, str]] = {}
    meta_ts: dict[str, dict[str, str]] = {}
    index = 0
    for split, count, labeled in groups:
        if count <= 0:
            continue
        os.makedirs(os.path.join(folder, f"images{split}"), exist_ok=True)
        if labeled:
            os.makedirs(os.path.join(folder, f"labels{split}"), exist_ok=True)
        for _ in range(count):
            index += 1
            patient = f"patient{index:03d}"
            rng = np.random.default_rng([seed, index])
            anat = sample_anatomy(rng, size)
            for phase in PHASES:
                case = f"{patient}_{phase}"
                image, label = render_volume(anat, phase, size, rng)
                _write_nifti(image, os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz"), spacing_xyz)
                if labeled:
                    _write_nifti(label, os.path.join(folder, f"labels{split}", f"{case}.nii.gz"), spacing_xyz)
                (meta_ts if split == "Ts" else meta_tr)[case] = {"patient": patient, "phase": phase}
    dataset_json = {
        "name": name,
        "description": "Synthetic cardiac-cine-like phantom written by nnunet_contrastive.prep.phantom "
                       f"(seed {seed}); not real anatomy.",
        "channel_names": {"0": "cineMRI"},
        "labels": dict(LABELS),
        "numTraining": 2 * num_train_patients,
        "file_ending": ".nii.gz",
        "meta_labels": ["patient", "phase"],
    }
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(dataset_json, f, indent=2)
    write_metadata(os.path.join(folder, "metadata.csv"), meta_tr, ["patient", "phase"])
    if meta_ts:
        write_metadata(os.path.join(folder, "metadata_Ts.csv"), meta_ts, ["patient", "phase"])
    return folder
