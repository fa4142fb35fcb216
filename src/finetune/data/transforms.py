"""Train and eval transforms built from one `Preprocessing` record.

The record comes from the pretrained weights' own metadata (mean, std, sizes, interpolation), so a
model trained on other statistics is fed what it expects; the data config may override any field.
It is stored in the checkpoint so that eval, predict and export rebuild the same pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from finetune.errors import FinetuneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    # RandomResizedCrop's area range for training; (1, 1) keeps the whole image.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    augment: bool = True
    # A random augmentation policy after crop and flip, on uint8 (timm's order):
    # "trivialaugment" (TrivialAugmentWide), "randaugment" (RandAugment) or None.
    auto_augment: str | None = None
    # JPEGs at least twice the resize size decoded at reduced scale (finetune.data.decode); a
    # checkpoint written before this field existed loads with True, the behaviour it was run with.
    draft_decode: bool = True
    # The crop size training batches reach the network at (FixRes: train lower than you test);
    # None: `crop_size`. Eval, predict, export and serve use `crop_size`. Old checkpoints: None.
    train_crop_size: int | None = None
    # The fields the data source or the user set, rather than the weights (decided once, by
    # finetune.data.preprocessing.decide_preprocessing). Not compared: the same values preprocess
    # the same whoever set them.
    explicit: tuple[str, ...] = field(default=(), compare=False)

    @property
    def train_size(self) -> int:
        return self.train_crop_size or self.crop_size

    def for_training(self) -> Preprocessing:
        """This record with the train size as its crop size (the resize size scaled with it, so an
        unaugmented training crop covers the same fraction of the image as evaluation's)."""
        if self.train_size == self.crop_size:
            return self
        return replace(self.override(crop_size=self.train_size), train_crop_size=None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(**_normalised({k: v for k, v in values.items() if k in cls.__dataclass_fields__}))

    def override(self, **values: Any) -> Preprocessing:
        """A copy with every non-None value replaced; a new crop size rescales the resize size."""
        values = {k: v for k, v in values.items() if v is not None}
        if "crop_size" in values and "resize_size" not in values:
            ratio = self.resize_size / self.crop_size
            values["resize_size"] = round(values["crop_size"] * ratio)
        return replace(self, **_normalised(values))


def _normalised(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key in ("mean", "std", "crop_scale"):
        if key in out:
            out[key] = tuple(float(x) for x in out[key])
    if "explicit" in out:
        out["explicit"] = tuple(str(x) for x in out["explicit"])
    for key in ("crop_size", "resize_size", "train_crop_size"):
        if out.get(key) is not None:
            out[key] = int(out[key])
    return out


def _interpolation(name: str) -> InterpolationMode:
    return InterpolationMode(name.lower())


AUTO_AUGMENT = {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}


def auto_augment_step(name: str | None, interpolation: str) -> list[Any]:
    """torchvision's TrivialAugmentWide or RandAugment (default magnitudes) as a list of zero or
    one step; it runs on PIL or uint8 images, so it goes before ToDtype."""
    if name is None:
        return []
    key = str(name).lower().replace("_", "").replace("-", "")
    if key not in AUTO_AUGMENT:
        raise FinetuneError(f"data.auto_augment={name} is not known; use trivialaugment, randaugment or null")
    return [AUTO_AUGMENT[key](interpolation=_interpolation(interpolation))]


def _to_normalised_tensor(p: Preprocessing) -> list[Any]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(p.mean), std=list(p.std)),
    ]


def train_transform(p: Preprocessing) -> v2.Compose:
    """RandomResizedCrop + flip (+ `auto_augment`) when augmenting; otherwise exactly the eval
    transform; both at the train size (`Preprocessing.for_training`)."""
    p = p.for_training()
    if not p.augment:
        return eval_transform(p)
    steps: list[Any] = [
        v2.RandomResizedCrop(
            p.crop_size, scale=p.crop_scale, interpolation=_interpolation(p.interpolation),
            antialias=True,
        )
    ]
    if p.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += auto_augment_step(p.auto_augment, p.interpolation)
    return v2.Compose(steps + _to_normalised_tensor(p))


def eval_transform(p: Preprocessing) -> v2.Compose:
    """Resize the short side, then center-crop: the standard ImageNet evaluation pipeline."""
    return v2.Compose(
        [
            v2.Resize(p.resize_size, interpolation=_interpolation(p.interpolation), antialias=True),
            v2.CenterCrop(p.crop_size),
            *_to_normalised_tensor(p),
        ]
    )


def denormalise(images: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    """Undo Normalize for display; returns values clamped to [0, 1]."""
    mean = torch.tensor(p.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(p.std, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


# --- tiny sources (CIFAR-10 at 224): per image at native size, upsampled per batch -------------
def native_train_transform(p: Preprocessing, native_size: int) -> v2.Compose:
    """The train transform at the source's own size, as uint8; `BatchResize(p.for_training())`
    makes it the train size.

    Upsampling a 32-pixel image to 224 in Pillow, then normalising 150,000 floats, costs more
    per image than the crop itself; on the batch (on the device) it is one vectorised call.
    """
    p = p.for_training()
    if not p.augment:
        return native_eval_transform(p, native_size)
    steps: list[Any] = [
        v2.RandomResizedCrop(
            native_size, scale=p.crop_scale, interpolation=_interpolation(p.interpolation), antialias=True
        )
    ]
    if p.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += auto_augment_step(p.auto_augment, p.interpolation)
    return v2.Compose(steps + [v2.ToImage()])


def native_eval_transform(p: Preprocessing, native_size: int) -> v2.Compose:
    """Resize + center-crop scaled down to the source's size (the same fraction of the image)."""
    crop = native_crop(p, native_size)
    return v2.Compose(
        [
            v2.Resize(native_size, interpolation=_interpolation(p.interpolation), antialias=True),
            v2.CenterCrop(crop),
            v2.ToImage(),
        ]
    )


def native_crop(p: Preprocessing, native_size: int) -> int:
    """The center crop at the source's size that covers what `crop_size` of `resize_size` does."""
    return max(1, round(native_size * p.crop_size / p.resize_size))


class BatchResize:
    """uint8 batch (N, C, h, w) -> normalised float (N, C, crop, crop), channels_last, on its device."""

    def __init__(self, p: Preprocessing) -> None:
        self.size = (p.crop_size, p.crop_size)
        self.mode = p.interpolation if p.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.mean = torch.tensor(p.mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(p.std).view(1, -1, 1, 1) * 255

    def describe(self) -> str:
        """Everything this step does to a batch, from the values it applies (mean and std in
        0-255 units, as float32): part of the frozen-feature cache key."""
        return (f"BatchResize(size={self.size}, mode={self.mode}, mean*255={self.mean.flatten().tolist()}, "
                f"std*255={self.std.flatten().tolist()}, uint8 in, channels_last float out)")

    __repr__ = describe

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.contiguous(memory_format=torch.channels_last)
        if x.shape[-2:] != self.size:
            # On uint8, antialias=True selects the vectorised (Pillow-equivalent) kernel; for
            # upsampling it gives plain bilinear/bicubic. CUDA has no uint8 path: go float first.
            if x.device.type != "cpu" or self.mode == "nearest":
                x = x.float()
            kwargs = {} if self.mode == "nearest" else {"antialias": True, "align_corners": False}
            x = torch.nn.functional.interpolate(x, size=self.size, mode=self.mode, **kwargs)
        return x.float().sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def upsample_on_device(source_size: int | None, crop_size: int) -> bool:
    """Tiny sources (at most half the crop size, e.g. CIFAR-10's 32 pixels fed at 224)."""
    return source_size is not None and 2 * source_size <= crop_size


@dataclass(frozen=True)
class EvalPipeline:
    """How evaluation reads images: `transform` per image, giving (3, `side`, `side`), then `batch`
    per batch on the device (None: nothing); `native` is the size tiny sources are cropped at
    (None: not a tiny source)."""

    transform: v2.Compose
    side: int
    batch: BatchResize | None = None
    native: int | None = None


def eval_pipeline(p: Preprocessing, source_size: int | None, resize_on_device: bool | None = None) -> EvalPipeline:
    """The one evaluation path that eval, predict and export's input check share: resize + center
    crop per image, or for tiny sources (`upsample_on_device`, or `resize_on_device=True`) the same
    crop at the source's own size and the upsampling + normalisation per batch (`BatchResize`)."""
    on_device = upsample_on_device(source_size, p.crop_size) if resize_on_device is None else resize_on_device
    if not on_device:
        return EvalPipeline(eval_transform(p), p.crop_size)
    native = source_size or p.crop_size
    return EvalPipeline(native_eval_transform(p, native), native_crop(p, native), BatchResize(p), native)
