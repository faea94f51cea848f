"""Throughput of DINO pretraining (``dino_xray`` bundle) on this machine.

Builds the student, teacher, loss, optimizer and training loader of the bundle (with any ``--key value``
overrides), runs warm-up iterations, then times ``--steps`` iterations of the real training step (teacher on
the global crops, student on all crops, loss, backward, per-parameter clipping, step, EMA) and reports images
per second, peak memory and the share of time spent waiting for data. The result is printed and appended as a
row to ``benchmarks/results.md``.

Examples (GPU)::

    # ViT-S/16, 2 x 224 + 8 x 96 crops (DINO's default multi-crop), bf16
    python benchmarks/dino_throughput.py --arch vit_small --local_crops_number 8 --optimizer_name adamw \
        --out_dim 65536 --use_bn_in_head false --batch_size 64 --amp bf16 --num_workers 8
    # ResNet-50, the DAX recipe (2 x 224 + 6 x 96, LARS, BN head, 60000 prototypes, fp32)
    python benchmarks/dino_throughput.py --batch_size 64 --num_workers 8
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import monai
import torch
from common import append_row, device_name, parse_args, parse_bundle, peak_memory, time_training

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "dino_xray" / "configs"
TITLE = "## DINO pretraining throughput (`benchmarks/dino_throughput.py`)"
HEADER = (
    "| date | device | torch / monai | arch | crops | out_dim | batch | amp | workers | images/s | s/iter | "
    "peak memory | data wait | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def main() -> None:
    args, overrides = parse_args(__doc__, [str(CONFIGS / "train.yaml")])
    parser = parse_bundle(args.config_file, overrides, knn_monitor=False)
    get = parser.get_parsed_content
    trainer = get("trainer")
    timing = time_training(trainer, args.steps, args.warmup, lambda batch: batch["crops"][0].shape[0])
    device, memory = trainer.device, peak_memory(trainer.device)
    print(
        f"{device_name(device)}: {timing.per_second:.1f} images/s, {timing.per_step:.3f} s/iter, peak {memory}, "
        f"data wait {timing.data_wait:.1%} over {timing.steps} iterations"
    )
    if args.no_record:
        return
    arch = get("arch") + (f"/{get('patch_size')}" if get("arch").startswith("vit") else "")
    crops = f"2x{get('global_crop_size')} + {get('local_crops_number')}x{get('local_crop_size')}"
    row = (
        f"| {datetime.date.today()} | {device_name(device)} | {torch.__version__} / {monai.__version__} "
        f"| {arch} | {crops} | {get('out_dim')} | {get('batch_size')} | {get('amp')} | {get('num_workers')} "
        f"| {timing.per_second:.1f} | {timing.per_step:.3f} | {memory} | {timing.data_wait:.1%} "
        f"| {args.note or ' '.join(sys.argv[1:])} |\n"
    )
    append_row(TITLE, HEADER, row)


if __name__ == "__main__":
    main()
