"""What does draft decoding cost in accuracy? The same model on the same JPEGs, decoded two ways:

    full    Pillow's full decode, then the eval transform (data.draft_decode=false)
    draft   JPEGs at least twice the resize size decoded at 1/2, 1/4 or 1/8 scale (the default)

Both arms read files through the product's own path (`finetune.data.image_files.model_inputs`:
the decoder and eval transform predict.py and export's parity check use, and the data module's).
The model is the packaged ImageNet EfficientNet-Lite0 (resize 256, crop 224, bicubic), frozen:

- CIFAR-10 photos (the copy in ../shared, optional) upscaled to --side pixels (bicubic) and saved
  as JPEG quality 90; a linear head is fitted on full-decode features of --train-per-class images
  per class, then --test-per-class test images per class are classified from each arm's features.
  Upscaled 32-pixel photos hold no detail finer than the source, which flatters draft decoding.
- scikit-image's sample photos (real detail), as JPEG quality 90 at their own size and at 2x:
  the ImageNet top-1 of each arm.

    python benchmarks/decode_cost.py [--archive ../shared/data/cifar10-jpeg.tar.gz] [--side 512]

The last line is `full_acc=<a> draft_acc=<b> agreement=<c> imagenet_agreement=<d>
skimage_agreement=<k>/<n>`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from linear_probe import ARCHIVE, PACKAGED, extract_subset
from PIL import Image
from torch.utils.data import DataLoader

from finetune.data.decode import decoder
from finetune.data.image_files import model_inputs
from finetune.data.transforms import Preprocessing
from finetune.models.backbones import create_network

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina")


def upscale_tree(src: Path, dst: Path, side: int) -> list[Path]:
    """Every JPEG under `src` resized to side x side (bicubic) and saved at quality 90 under `dst`."""
    out = []
    for path in sorted(src.rglob("*.jpg")):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(target, quality=90)
        out.append(target)
    return out


def skimage_jpegs(dst: Path) -> list[Path]:
    """scikit-image's bundled colour photos as JPEG quality 90, at their own size and at 2x."""
    import skimage.data

    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for name in SKIMAGE_PHOTOS:
        try:
            image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        except (ModuleNotFoundError, OSError, ValueError) as e:  # needs a download (pooch)
            print(f"skimage.data.{name}: left out ({type(e).__name__})")
            continue
        for scale in (1, 2):
            path = dst / f"{name}-x{scale}.jpg"
            image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC).save(path, quality=90)
            out.append(path)
    return out


@torch.no_grad()
def features_and_logits(model, files: list[Path], p: Preprocessing, batch_size: int):
    """Pooled features and ImageNet logits of `files` read as `p` says."""
    dataset = model_inputs(files, p)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate)
    feats, logits = [], []
    for images, _, skipped in loader:
        assert not skipped, skipped
        images = images.contiguous(memory_format=torch.channels_last)
        f = model.forward_head(model.forward_features(images), pre_logits=True)
        feats.append(f)
        logits.append(model.get_classifier()(f))
    return torch.cat(feats), torch.cat(logits)


def fit_linear_head(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3) -> torch.nn.Linear:
    """Multinomial logistic regression on frozen features (L-BFGS, small L2)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def labels_of(files: list[Path], classes: list[str]) -> torch.Tensor:
    return torch.tensor([classes.index(f.parent.name) for f in files])


def cifar_arms(model, p: Preprocessing, args, work: Path) -> dict[str, float]:
    start = time.perf_counter()
    small = extract_subset(args.archive, work / "cifar",
                           {"train": args.train_per_class, "test": args.test_per_class})
    train_files = upscale_tree(small / "train", work / "big" / "train", args.side)
    test_files = upscale_tree(small / "test", work / "big" / "test", args.side)
    classes = sorted({f.parent.name for f in train_files})
    print(f"data: {len(train_files)} train, {len(test_files)} test CIFAR-10 photos at {args.side}x{args.side} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    full, draft = replace(p, draft_decode=False), replace(p, draft_decode=True)

    start = time.perf_counter()
    train_x, _ = features_and_logits(model, train_files, full, args.batch_size)
    head = fit_linear_head(train_x, labels_of(train_files, classes), len(classes))
    y = labels_of(test_files, classes)
    out = {}
    with torch.no_grad():
        (fx, fl), (dx, dl) = (features_and_logits(model, test_files, q, args.batch_size) for q in (full, draft))
        pf, pd = head(fx).argmax(1), head(dx).argmax(1)
    out["full_acc"] = float((pf == y).float().mean())
    out["draft_acc"] = float((pd == y).float().mean())
    out["agreement"] = float((pf == pd).float().mean())
    out["imagenet_agreement"] = float((fl.argmax(1) == dl.argmax(1)).float().mean())
    print(f"CIFAR-10 at {args.side}: head acc full {out['full_acc']:.4f}, draft {out['draft_acc']:.4f}, "
          f"head top-1 agreement {out['agreement']:.4f}, ImageNet top-1 agreement "
          f"{out['imagenet_agreement']:.4f} on {len(test_files)} images ({time.perf_counter() - start:.0f} s)",
          flush=True)
    return out


def skimage_arms(model, p: Preprocessing, work: Path, batch_size: int) -> tuple[int, int]:
    files = skimage_jpegs(work / "skimage")
    _, full = features_and_logits(model, files, replace(p, draft_decode=False), batch_size)
    _, draft = features_and_logits(model, files, replace(p, draft_decode=True), batch_size)
    read_draft = decoder(replace(p, draft_decode=True))
    for path, f, d in zip(files, full.softmax(1), draft.softmax(1)):
        with Image.open(path) as image:
            size = image.size
        print(f"  {path.name}: {size[0]}x{size[1]}, draft decodes at {read_draft(str(path)).size}; "
              f"ImageNet top-1 full {int(f.argmax())} vs draft {int(d.argmax())}, "
              f"p(full's top-1) {float(f.max()):.3f} vs {float(d[f.argmax()]):.3f}")
    return int((full.argmax(1) == draft.argmax(1)).sum()), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--side", type=int, default=512, help="upscaled CIFAR-10 photo size (>= 512 for draft)")
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    model, p = create_network("tf_efficientnet_lite0", PACKAGED)
    model.eval().to(memory_format=torch.channels_last)  # fp32: the arms differ only in decoding
    print(f"model: tf_efficientnet_lite0 ({PACKAGED}), {p}", flush=True)
    results = {"full_acc": float("nan"), "draft_acc": float("nan"), "agreement": float("nan"),
               "imagenet_agreement": float("nan")}
    with tempfile.TemporaryDirectory(prefix="decode-cost-") as tmp:
        if args.archive.is_file():
            results = cifar_arms(model, p, args, Path(tmp))
        else:
            print(f"CIFAR-10 part skipped: {args.archive} not found (see ../shared/README.md)")
        agree, n = skimage_arms(model, p, Path(tmp), args.batch_size)
    print(" ".join(f"{k}={v:.4f}" for k, v in results.items()) + f" skimage_agreement={agree}/{n}")


if __name__ == "__main__":
    sys.exit(main())
