"""Helpers of the bad-input tests: damaged files made inside the test, a command's outcome, byte-exact snapshots."""
from __future__ import annotations

import gzip
import os

import numpy as np


def snapshot(*folders: str) -> dict[str, bytes]:
    """path -> bytes of every file below `folders` (test data are small): compare before and after a command."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[path] = f.read()
    return out


def run_main(capsys, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `nnunet-contrastive ARGS` in this process; an uncaught exception (a bare
    traceback for the user) fails the test."""
    from nnunet_contrastive.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *names: str) -> None:
    """Exit code 1, one `error:` message, no traceback, and every one of `names` in it."""
    assert rc == 1, err
    assert err.startswith("error: ") or "\nerror: " in err, err
    assert "Traceback" not in err, err
    for name in names:
        assert name in err, f"{name!r} not in:\n{err}"


def truncate(path: str, fraction: float = 0.5) -> None:
    """Cut a file to `fraction` of its bytes (an interrupted copy)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def gzip_garbage(path: str) -> None:
    """A file that is not gzip at all, under an image name."""
    write_bytes(path, b"this is not an image\n" * 10)


def gzip_of_zeros(path: str) -> None:
    """A complete gzip stream whose content is no NIfTI header."""
    write_bytes(path, gzip.compress(b"\0" * 512))


def _sitk():
    import SimpleITK as sitk

    return sitk


def make_4d(path: str, copies: int = 2) -> None:
    """Replace a 3D image by a 4D one holding `copies` volumes (a second channel or time point)."""
    sitk = _sitk()
    img = sitk.ReadImage(path)
    sitk.WriteImage(sitk.JoinSeries([img] * copies), path, useCompression=True)


def set_voxel(path: str, value) -> None:
    """Write `value` into one voxel of a label map (e.g. a label the dataset does not declare)."""
    sitk = _sitk()
    img = sitk.ReadImage(path)
    arr = sitk.GetArrayFromImage(img)
    if isinstance(value, float):  # a label map saved with a floating-point voxel type
        arr = arr.astype(np.float32)
    arr.flat[0] = value
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    sitk.WriteImage(new, path, useCompression=True)


def crop_one_slice(path: str) -> None:
    """Drop the last slice: the file no longer shares its partner's voxel grid."""
    sitk = _sitk()
    img = sitk.ReadImage(path)
    size = list(img.GetSize())
    size[2] -= 1
    sitk.WriteImage(sitk.RegionOfInterest(img, size, [0, 0, 0]), path, useCompression=True)


def write_image(path: str, array_zyx, spacing=(1.0, 1.0, 1.0)) -> None:
    sitk = _sitk()
    img = sitk.GetImageFromArray(np.asarray(array_zyx))
    img.SetSpacing(spacing)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(img, path, useCompression=True)


def edit_text(path: str, old: str, new: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert old in text, (old, path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))


def edit_bytes(path: str, old: bytes, new: bytes) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert old in data, (old, path)
    write_bytes(path, data.replace(old, new))


def prepend_bom(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    write_bytes(path, b"\xef\xbb\xbf" + data)
