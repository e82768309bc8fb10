"""Training samples: random-crop tiles with augmentation, and full-size evaluation images.

Images are float32 in [0, 1]; the network sees them standardised per image (zero mean,
unit variance over the whole micrograph), which removes SEM brightness and contrast
differences between sessions and detectors. Masks are uint8 class indices (255 = ignore).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from tqdm import tqdm

from srpu_pipelines.config import IGNORE_INDEX, AugmentParams
from srpu_pipelines.data.imageio import read_grey
from srpu_pipelines.data.masks import MaskCodec, item_mask
from srpu_pipelines.errors import InputError

log = logging.getLogger(__name__)
_MAX_COORDS = 4096  # per image and class, for class-centred crops


SCALE_TOLERANCE = 0.02  # closer to 1 than this: the image is used as it is (no blur)
MAX_SCALE = 8.0  # a larger enlargement or reduction is a unit mistake, not a plan


def resample_scale(pixel_size_nm: float | None, target_nm: float | None) -> float:
    """How much an image of ``pixel_size_nm`` is enlarged to reach ``target_nm`` pixels
    (> 1: its pixels are coarser than the target); 1 when either is unknown or None, or
    when the two are within SCALE_TOLERANCE (an interpolation would only blur).

    Raises InputError beyond MAX_SCALE either way (nm given as um, or the reverse)."""
    if not target_nm or not pixel_size_nm:
        return 1.0
    s = float(pixel_size_nm) / float(target_nm)
    if not 1.0 / MAX_SCALE <= s <= MAX_SCALE:
        raise InputError(
            f"resampling an image of {pixel_size_nm:g} nm pixels to {target_nm:g} nm would "
            f"scale it {s:.3g}x (more than {MAX_SCALE:g}x either way): check that "
            "train.resample_nm and the pixel sizes are in nm"
        )
    return 1.0 if abs(s - 1.0) < SCALE_TOLERANCE else s


def scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def resize_image(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A grey float image resampled to ``shape`` (rows, cols): area averaging when it
    shrinks (no aliasing), bilinear when it grows; the same array when the size is kept."""
    if tuple(img.shape[:2]) == tuple(shape):
        return img
    shrink = shape[0] * shape[1] < img.shape[0] * img.shape[1]
    how = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(img.astype(np.float32), (shape[1], shape[0]), interpolation=how)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A uint8 class-index mask resampled to ``shape`` by nearest neighbour, pixel centres
    aligned as the image's resampling aligns them: no class or 'ignore' value is invented
    between two others, and labels do not shift against the image."""
    if tuple(mask.shape) == tuple(shape):
        return mask
    return cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def stretch(img: np.ndarray) -> np.ndarray:
    """Min-max stretch to [0, 1]. A 12-bit image stored as 16-bit spans only 0..0.06, where
    brightness and noise augmentation (on the 0..1 scale) would swamp it; the network input
    is standardised per image afterwards, so this changes nothing else."""
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def read_sample(path: str | Path, bar_rows: int = 0) -> np.ndarray:
    """The image above its data bar (``bar_rows`` rows), min-max stretched: what training,
    scoring, pretraining and prediction see of a file."""
    img = read_grey(Path(path))
    return stretch(img[: img.shape[0] - bar_rows] if bar_rows else img)


def standardize(img: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(H, W) float -> float32 with zero mean and unit variance over the image."""
    img = img.astype(np.float32)
    return (img - img.mean()) / max(float(img.std()), eps)


@dataclass
class Sample:
    """One labelled micrograph in memory: the sample above its data bar (``bar_rows``
    rows of the file are cut off: they are no sample, so never trained, scored or
    counted)."""

    id: str
    dataset: str
    image: np.ndarray  # float32 (H, W) in [0, 1]
    mask: np.ndarray  # uint8 (H, W)
    mean: float
    std: float
    bar_rows: int = 0
    pixel_size_nm: float | None = None  # of ``image`` as held (after any resampling)
    scale: float = 1.0  # ``image`` is the file's sample enlarged this much (resampling)

    @property
    def normalized(self) -> np.ndarray:
        return (self.image - self.mean) / self.std


def load_samples(
    items: list[dict[str, Any]],
    codec: MaskCodec,
    desc: str = "load",
    progress: bool = True,
    resample_nm: float | None = None,
    upsample: float = 1.0,
) -> list[Sample]:
    """Read the index items' images and masks into memory, each cut above its data bar.

    With ``resample_nm``, each sample whose pixel size is known is resampled to pixels of
    that size (image by area/bilinear, mask by nearest neighbour), so sub-datasets imaged
    at different magnifications reach the network at one scale; a sample of unknown pixel
    size stays at its own pixels (logged). ``upsample`` then enlarges every sample by
    that factor (thin phases drawn over more pixels)."""
    out = []
    unknown = []
    for it in tqdm(items, desc=desc, disable=not progress, unit="img", leave=False):
        img = read_grey(Path(it["image"]))
        mask = item_mask(it, codec)  # the data bar, if any, not labelled
        if img.shape != mask.shape:
            raise InputError(f"{it['mask']}: mask size {mask.shape} differs from image {img.shape}")
        bar = int(it.get("data_bar_rows") or 0)
        rows = img.shape[0] - bar
        img = stretch(img[:rows])
        mask = np.ascontiguousarray(mask[:rows])
        nm = it.get("pixel_size_nm") or None
        to_target = resample_scale(nm, resample_nm)
        if resample_nm and not nm:
            unknown.append(it["id"])
        scale = to_target * upsample
        if scale != 1.0:
            shape = scaled_shape(img.shape, scale)
            img = np.clip(resize_image(img, shape), 0.0, 1.0)
            mask = resize_mask(mask, shape)
            if nm:  # the pixel size as held
                base = float(resample_nm) if to_target != 1.0 else float(nm)  # type: ignore[arg-type]
                nm = base / upsample
        out.append(
            Sample(
                it["id"],
                it["dataset"],
                img,
                mask,
                float(img.mean()),
                max(float(img.std()), 1e-6),
                bar,
                float(nm) if nm else None,
                scale,
            )
        )
    if unknown:
        log.warning(
            "%d image(s) of unknown pixel size kept at their own pixels, not resampled to "
            "%g nm (e.g. %s): data.datasets[].pixel_size_nm sets one",
            len(unknown),
            resample_nm,
            ", ".join(unknown[:3]),
        )
    return out


def build_augment(p: AugmentParams) -> A.Compose:
    ops: list[A.BasicTransform] = []
    if p.flips:
        ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if p.rotate90:
        ops.append(A.RandomRotate90(p=0.5))
    if p.brightness_contrast > 0:
        ops.append(A.RandomBrightnessContrast(p.brightness_contrast, p.brightness_contrast, p=0.5))
    if p.gamma > 0:
        g = int(round(100 * p.gamma))
        ops.append(A.RandomGamma(gamma_limit=(100 - g, 100 + g), p=0.3))
    if p.blur > 0:
        ops.append(A.GaussianBlur(blur_limit=(3, 5), p=p.blur))
    if p.noise > 0:
        ops.append(A.GaussNoise(std_range=(0.0, p.noise), p=0.3))
    return A.Compose(ops)


class TileSampler(torch.utils.data.Dataset):
    """Random crops of ``tile`` x ``tile`` from the samples, ``length`` per epoch.

    A share ``rare_crop_prob`` of crops is centred on a pixel of a class drawn uniformly
    from the classes present, so a phase covering 1 % of pixels is seen in many crops.
    Item ``epoch * length + i`` is crop ``i`` of epoch ``epoch``, drawn from a generator
    seeded by (seed, epoch, i) alone: the same crops whatever the DataLoader workers or
    data-parallel processes, and a run resumed at an epoch boundary sees the same data.
    """

    def __init__(
        self,
        samples: list[Sample],
        tile: int,
        length: int,
        num_classes: int,
        augment: AugmentParams,
        rare_crop_prob: float,
        seed: int,
    ):
        if not samples:
            raise InputError("no training images: check train.splits and the dataset index")
        self.samples, self.tile, self.length = samples, tile, length
        self.rare_crop_prob, self.seed = rare_crop_prob, seed
        self.aug = build_augment(augment)
        self.coords: list[dict[int, np.ndarray]] = []
        rng = np.random.default_rng(seed)
        for s in samples:
            per_class = {}
            for c in range(num_classes):
                ys, xs = np.nonzero(s.mask == c)
                if len(ys):
                    keep = rng.choice(len(ys), min(len(ys), _MAX_COORDS), replace=False)
                    per_class[c] = np.stack([ys[keep], xs[keep]], 1)
            self.coords.append(per_class)
        self.present = sorted({c for pc in self.coords for c in pc})

    def __len__(self) -> int:
        return self.length

    def _crop(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Sample]:
        t = self.tile
        if rng.random() < self.rare_crop_prob:
            c = self.present[rng.integers(len(self.present))]
            with_c = [i for i, pc in enumerate(self.coords) if c in pc]
            i = with_c[rng.integers(len(with_c))]
            cy, cx = self.coords[i][c][rng.integers(len(self.coords[i][c]))]
            cy, cx = cy + rng.integers(-t // 4, t // 4 + 1), cx + rng.integers(-t // 4, t // 4 + 1)
        else:
            i = int(rng.integers(len(self.samples)))
            h, w = self.samples[i].mask.shape
            cy, cx = rng.integers(0, h), rng.integers(0, w)
        s = self.samples[i]
        img, mask = _pad_to(s.image, s.mask, t)
        h, w = mask.shape
        y0 = int(np.clip(cy - t // 2, 0, h - t))
        x0 = int(np.clip(cx - t // 2, 0, w - t))
        return img[y0 : y0 + t, x0 : x0 + t], mask[y0 : y0 + t, x0 : x0 + t], s

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, T, T) float32 standardised image and (T, T) int64 mask (the model repeats the
        grey channel when it takes more than one)."""
        epoch, i = divmod(int(index), self.length)
        rng = np.random.default_rng([self.seed, epoch, i])
        img, mask, s = self._crop(rng)
        self.aug.set_random_seed(int(rng.integers(2**31)))
        out = self.aug(image=np.ascontiguousarray(img), mask=np.ascontiguousarray(mask))
        x = (np.clip(out["image"], 0, 1) - s.mean) / s.std
        return torch.from_numpy(x[None].astype(np.float32)), torch.from_numpy(
            out["mask"].astype(np.int64)
        )


def _pad_to(img: np.ndarray, mask: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    ph, pw = max(0, t - img.shape[0]), max(0, t - img.shape[1])
    if not (ph or pw):
        return img, mask
    img = np.pad(img, ((0, ph), (0, pw)), mode="reflect")
    mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    return img, mask
