"""Check image and label files before anything is converted, preprocessed or trained on.

SimpleITK, and therefore nnU-Net, fills the missing part of a truncated `.nii.gz` with zeros without a word: the
case then trains with half of its slices missing. These checks read every file completely:

- decodable: the whole gzip stream (a truncated or corrupt file fails its end-of-stream or CRC check) and, for
  NIfTI, as many voxel bytes as the header announces;
- one channel per file and 2D or 3D (a 4D file holds several channels or time points; nnU-Net needs one file per
  channel: `<case>_0000`, `<case>_0001`, ...), or, for MSD sources, exactly the channels of `modality`;
- the channel files of a case and its label have one voxel grid (shape and spacing);
- label values are integers among the values of `dataset.json` `labels`.

NIfTI files (`.nii.gz`, `.nii`) are read with nibabel from the decompressed bytes (one pass per file); other
formats SimpleITK reads (`.nrrd`, `.mha`, ...) with SimpleITK. Natural-image formats (`.png`, `.tif`, ...) are only
checked for being readable. Every function returns a list of error messages naming the file (empty: all good), so
callers can report every problem at once.
"""
from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass

import numpy as np

from nnunet_contrastive.errors import UserInputError

NIFTI_ENDINGS = (".nii.gz", ".nii")
NATURAL_IMAGE_ENDINGS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
SPACING_RTOL = 1e-3


class ImageFileError(UserInputError):
    """An image or label file that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class ImageInfo:
    """What the checks need of one file: spatial shape (x, y[, z]), number of channels/volumes in it, spacing."""

    path: str
    shape: tuple[int, ...]
    channels: int
    spacing: tuple[float, ...]

    @property
    def dimension(self) -> int:
        return len(self.shape)


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the third, as SimpleITK does when it reads a NIfTI file."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read_bytes(path: str) -> bytes:
    """All bytes of a NIfTI file, decompressed; ImageFileError when the file is truncated or corrupt."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise ImageFileError("is truncated: the compressed data ends early (an interrupted copy or download?).",
                             where=path, fix="Copy the file again from its source.") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise ImageFileError(f"is not a valid gzip file ({e}).", where=path,
                             fix="Copy the file again from its source.") from None
    except OSError as e:
        raise ImageFileError(f"cannot be read ({e.strerror or e}).", where=path) from None


def _nifti_from_bytes(path: str, data: bytes):
    import nibabel as nib

    if len(data) < 348:
        raise ImageFileError(f"has {len(data)} bytes, fewer than a NIfTI header.", where=path,
                             fix="Copy the file again from its source.")
    sizeof_hdr = int.from_bytes(data[:4], "little")
    if sizeof_hdr not in (348, 540):
        sizeof_hdr = int.from_bytes(data[:4], "big")
    image_class = nib.Nifti2Image if sizeof_hdr == 540 else nib.Nifti1Image
    logger = nib.imageglobals.logger  # it prints its header repairs to stderr; our message says it all
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        image = image_class.from_bytes(data)
        proxy = image.dataobj
        expected = int(proxy.offset) + int(np.prod(proxy.shape)) * proxy.dtype.itemsize
    except Exception as e:  # nibabel raises several types for a malformed header
        raise ImageFileError(f"is not a readable NIfTI image ({e.__class__.__name__}: {e}).", where=path) from None
    finally:
        logger.setLevel(level)
    if len(data) < expected:
        raise ImageFileError(f"is truncated: the header announces {expected} bytes of voxel data and header, the "
                             f"file holds {len(data)}.", where=path, fix="Copy the file again from its source.")
    return image


def _nifti_info(path: str, image) -> ImageInfo:
    shape = _squeeze_trailing(image.shape)
    zooms = tuple(float(z) for z in image.header.get_zooms())
    spatial = shape[:3] if len(shape) > 3 else shape
    return ImageInfo(path=path, shape=spatial, channels=int(np.prod(shape[3:])) if len(shape) > 3 else 1,
                     spacing=zooms[:len(spatial)])


def _sitk_read(path: str):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise ImageFileError(f"cannot be read as an image ({str(e).strip().splitlines()[-1]}).", where=path) from None


def _sitk_info(path: str, image) -> ImageInfo:
    size = tuple(int(s) for s in image.GetSize())
    spacing = tuple(float(s) for s in image.GetSpacing())
    components = image.GetNumberOfComponentsPerPixel()
    if len(size) > 3:
        return ImageInfo(path=path, shape=size[:3], channels=int(np.prod(size[3:])) * components, spacing=spacing[:3])
    return ImageInfo(path=path, shape=size, channels=components, spacing=spacing)


def read_image(path: str, want_values: bool = False) -> tuple[ImageInfo | None, np.ndarray | None]:
    """Read the whole file: (info, sorted unique voxel values if `want_values`). Raises ImageFileError.

    Natural-image files give (None, values or None): nnU-Net reads them with its own reader.
    """
    if path.endswith(NIFTI_ENDINGS):
        image = _nifti_from_bytes(path, _read_bytes(path))
        values = None
        if want_values:
            try:
                values = np.unique(np.asanyarray(image.dataobj))
            except Exception as e:  # a voxel type nibabel cannot decode
                raise ImageFileError(f"voxel data cannot be decoded ({e}).", where=path) from None
        return _nifti_info(path, image), values
    import SimpleITK as sitk

    image = _sitk_read(path)
    values = np.unique(sitk.GetArrayViewFromImage(image)) if want_values else None
    if path.lower().endswith(NATURAL_IMAGE_ENDINGS):
        return None, values
    return _sitk_info(path, image), values


def declared_label_values(labels: dict) -> set[int]:
    """The integer values `dataset.json` `labels` allows (region-based labels list several per name)."""
    out: set[int] = set()
    for value in labels.values():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            out.add(int(v))
    return out


def _shape_text(info: ImageInfo) -> str:
    return "x".join(str(s) for s in info.shape)


def channel_problems(info: ImageInfo, expected_channels: int, context: str) -> list[str]:
    """A file must hold `expected_channels` channels (1: a 2D or 3D image; n > 1: a 4D image with n volumes)."""
    if info.channels == expected_channels and info.dimension in (2, 3):
        return []
    if expected_channels == 1:
        return [f"{info.path}: holds {info.channels} channels/volumes ({_shape_text(info)} x {info.channels}) but "
                f"{context} lists 1 channel. List every channel there (a raw dataset then needs one file per "
                f"channel: <case>_0000, <case>_0001, ...), or keep only the channel you want in this file."]
    return [f"{info.path}: expected a 4D image with {expected_channels} channels ({context}), got "
            f"{info.channels} channel(s) of shape {_shape_text(info)}. Fix the image or the channel list."]


def grid_problems(reference: ImageInfo, other: ImageInfo, what: str) -> list[str]:
    """`other` (another channel, or the label) must share `reference`'s voxel grid: shape and spacing."""
    if reference.shape != other.shape:
        return [f"{other.path}: {what} has shape {_shape_text(other)} but {reference.path} has "
                f"{_shape_text(reference)}: they do not belong together. Fix or replace one of them."]
    if not np.allclose(reference.spacing, other.spacing, rtol=SPACING_RTOL, atol=0):
        return [f"{other.path}: {what} has spacing {other.spacing} but {reference.path} has {reference.spacing}. "
                f"Resample one of them so that image and label share one voxel grid."]
    return []


def label_value_problems(path: str, values: np.ndarray, allowed: set[int], context: str) -> list[str]:
    """Label values must be integers among `allowed`."""
    non_integer = [v for v in values.tolist() if float(v) != int(v)]
    if non_integer:
        return [f"{path}: label values must be integers, found {non_integer[:5]}. Save the label map with an "
                f"integer voxel type."]
    unknown = sorted({int(v) for v in values.tolist()} - allowed)
    if unknown:
        return [f"{path}: label value(s) {unknown[:10]} are not among the labels of {context} "
                f"({sorted(allowed)}). Fix the label map (or the list of labels)."]
    return []


def case_problems(image_files: list[str], label_file: str | None = None, allowed_labels: set[int] | None = None,
                  channels_per_file: int = 1, context: str = "dataset.json 'channel_names'",
                  label_context: str = "dataset.json 'labels'") -> list[str]:
    """Every problem of one case: its image files (one per channel, or one 4D file with `channels_per_file`
    channels) and its optional label. `context` names the source of the channel and label lists in messages."""
    errors: list[str] = []
    infos: list[ImageInfo] = []
    for path in image_files:
        try:
            info, _ = read_image(path)
        except ImageFileError as e:
            errors.append(str(e))
            continue
        if info is None:
            continue
        problems = channel_problems(info, channels_per_file, context)
        errors += problems
        if not problems:
            infos.append(info)
    for info in infos[1:]:
        errors += grid_problems(infos[0], info, "this channel")
    if label_file is not None:
        try:
            info, values = read_image(label_file, want_values=True)
        except ImageFileError as e:
            return errors + [str(e)]
        if info is not None:
            label_errors = channel_problems(info, 1, "a label map")
            if not label_errors and infos:
                label_errors = grid_problems(infos[0], info, "the label")
            errors += label_errors
        if allowed_labels is not None:
            errors += label_value_problems(label_file, values, allowed_labels, label_context)
    return errors
