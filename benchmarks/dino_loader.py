"""Per-image cost of the DINO training loader's random stage in one worker, against DINO's plain uint8 multi-crop.

The ViT-S multi-crop recipe (2 x 224 + 8 x 96 crops, scales 0.4-1 / 0.05-0.4) on demo X-rays upsampled to
``--image_size`` (the files in ``data/xray/kermany`` are 224 x 224; 2048 is a typical chest X-ray):

- ours: the ``dino_xray`` bundle's path. Not timed, as ``CacheDataset`` does it once: ``XRayToUint8d`` (``dax_v2``
  preprocessing, reduced to the working size, uint8). Timed per image: the cache's copy of the item,
  ``RandXRayVariantd`` and ``MultiCropd(DINOMultiCrop)`` with augmentation ``v1`` or ``v2``, with the colour, blur,
  solarisation and sharpness in the worker (CPU augmentation) or left to the GPU (device augmentation);
- baseline: what DINO would do after decoding, torchvision v2 transforms on the full-resolution uint8 image: per
  crop ``RandomResizedCrop`` (square, bicubic, antialiased), horizontal and vertical flips, ``ColorJitter``
  (brightness and contrast 0.4, p 0.8), ``GaussianBlur`` (13 px, sigma 0.1-2; p 1 / 0.1 / 0.5) and ``RandomSolarize``
  (global 2, p 0.2); no float conversion (ours ends in uint8 too).

Everything runs in this process on one thread (a DataLoader worker has one), the variants in alternating blocks
over the same images; the figure per variant is the median time per image. Prints images/s per worker and the
ratio ours/baseline of the time per image, and appends a row to ``benchmarks/results.md``.

    python benchmarks/dino_loader.py                        # 2048 px X-rays
    python benchmarks/dino_loader.py --images 4 --repeats 2 --image_size 512 --no_record   # seconds, as CI
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from common import append_row, cpu_name
from torchvision.transforms import v2

from dae.data.multicrop import DINOMultiCrop, MultiCropd
from dae.data.xray import read_xray
from dae.data.xray_uint8 import RandXRayVariantd, XRayToUint8d

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "xray" / "kermany"
TITLE = "## DINO loader (`benchmarks/dino_loader.py`)"
HEADER = (
    "| date | CPU | torch / torchvision | X-ray | working size | crops | baseline images/s | v1 CPU aug | "
    "v1 device aug | v2 CPU aug | v2 device aug | largest ratio ours/baseline |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)
RECIPE = {
    "global_size": 224,
    "local_size": 96,
    "global_scale": (0.4, 1.0),
    "local_scale": (0.05, 0.4),
    "local_crops_number": 8,
}
VARIANTS = (("v1", True), ("v1", False), ("v2", True), ("v2", False))


def _label(version: str, photometric: bool) -> str:
    return f"{version}-{'cpu' if photometric else 'device'}"


def demo_xrays(count: int, size: int) -> list[torch.Tensor]:
    """``count`` demo X-rays upsampled (bicubic) to ``size`` x ``size``, as decoded 8-bit values in float32."""
    paths = sorted(DEMO.rglob("*.jpeg"))[:count]
    if len(paths) < count:
        raise SystemExit(f"only {len(paths)} demo X-rays in {DEMO}, asked for {count}")
    images = []
    for path in paths:
        array, _ = read_xray(path)
        big = F.interpolate(torch.from_numpy(array)[None, None], size=(size, size), mode="bicubic", antialias=False)
        images.append(big[0].clamp_(0.0, 255.0).round_())
    return images


def baseline_multicrop() -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """DINO's multi-crop (X-ray flips, square crops) with torchvision v2 transforms on a uint8 image."""

    def crop(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
        steps = [
            v2.RandomResizedCrop(
                size, scale=scale, ratio=(1.0, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
            v2.RandomApply([v2.GaussianBlur(13, sigma=(0.1, 2.0))], p=blur_p),
        ]
        return v2.Compose(steps + ([v2.RandomSolarize(threshold=128, p=solarize_p)] if solarize_p else []))

    global_1 = crop(RECIPE["global_size"], RECIPE["global_scale"], 1.0, 0.0)
    global_2 = crop(RECIPE["global_size"], RECIPE["global_scale"], 0.1, 0.2)
    local = crop(RECIPE["local_size"], RECIPE["local_scale"], 0.5, 0.0)
    return lambda x: [global_1(x), global_2(x)] + [local(x) for _ in range(RECIPE["local_crops_number"])]


def time_blocks(samples: dict[str, Callable[[int], object]], count: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per image of each sample function, in alternating blocks of ``count`` images (one untimed block)."""
    times: dict[str, list[float]] = {name: [] for name in samples}
    names = list(samples)
    for repeat in range(repeats + 1):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate the order
            for index in range(count):
                tic = time.perf_counter()
                samples[name](index)
                if repeat > 0:
                    times[name].append(time.perf_counter() - tic)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="distinct demo X-rays")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the images per variant")
    parser.add_argument("--image_size", type=int, default=2048, help="side of the upsampled X-rays")
    parser.add_argument("--no_record", action="store_true", help="do not append to benchmarks/results.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    floats = demo_xrays(args.images, args.image_size)
    uint8 = [x.to(torch.uint8) for x in floats]
    working = DINOMultiCrop(**RECIPE).working_size
    cache = XRayToUint8d("image", "dax_v2", size=working)
    cached = [cache({"image": x}) for x in floats]
    variant = RandXRayVariantd("image")
    baseline = baseline_multicrop()
    samples: dict[str, Callable[[int], object]] = {"baseline": lambda i: baseline(uint8[i])}
    for version, photometric in VARIANTS:
        crops = MultiCropd("image", DINOMultiCrop(version, photometric=photometric, **RECIPE), drop_image=True)
        samples[_label(version, photometric)] = lambda i, crops=crops: crops(variant(copy.deepcopy(cached[i])))
    times = time_blocks(samples, args.images, args.repeats)

    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: median[name] / median["baseline"] for name in median if name != "baseline"}
    crops = f"2x{RECIPE['global_size']} + {RECIPE['local_crops_number']}x{RECIPE['local_size']}"
    print(
        f"DINO loader, one worker (1 thread, {cpu_name()}): ViT-S recipe {crops}, {args.images} demo X-rays "
        f"upsampled to {args.image_size}x{args.image_size} (a typical chest X-ray is about 2048 px; the demo files "
        f"are 224x224), ours cached as dax_v2 uint8 at {working} px; median of {args.repeats} x {args.images} images"
    )
    rate = {name: 1 / seconds for name, seconds in median.items()}
    print(f"  baseline (torchvision v2 DINO multi-crop on full-resolution uint8): {rate['baseline']:.1f} images/s")
    for name, ratio in ratios.items():
        version, where = name.split("-")
        print(f"  ours {version}, {where} augmentation: {rate[name]:.1f} images/s, ratio {ratio:.3f}")
    listed = ", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items())
    print(f"ratio ours/baseline (time per image; <= 1.0: ours is faster): {listed}")
    if args.no_record:
        return
    row = (
        f"| {datetime.date.today()} | {cpu_name()} | {torch.__version__} / {torchvision.__version__} "
        f"| {args.image_size}x{args.image_size} (demo upsampled) | {working} | {crops} | {rate['baseline']:.1f} | "
        + " | ".join(f"{rate[_label(*v)]:.1f}" for v in VARIANTS)
        + f" | {max(ratios.values()):.3f} |\n"
    )
    append_row(TITLE, HEADER, row)


if __name__ == "__main__":
    main()
