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

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import monai
import torch
from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser
from results_table import append_row, device_name, peak_memory

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "dino_xray" / "configs"
TITLE = "## DINO pretraining throughput (`benchmarks/dino_throughput.py`)"
HEADER = (
    "| date | device | torch / monai | arch | crops | out_dim | batch | amp | workers | images/s | s/iter | "
    "peak memory | data wait | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def parse_args() -> tuple[argparse.Namespace, dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", nargs="+", default=[str(CONFIGS / "train.yaml")])
    parser.add_argument("--steps", type=int, default=20, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--note", default="", help="free text for the results table")
    parser.add_argument("--no_record", action="store_true", help="do not append to benchmarks/results.md")
    args, rest = parser.parse_known_args()
    overrides: dict[str, object] = {}
    for i in range(0, len(rest), 2):
        if not rest[i].startswith("--") or i + 1 >= len(rest):
            parser.error(f"overrides must be '--key value' pairs, got {rest[i:]}")
        overrides[rest[i][2:]] = DefaultParseValue(rest[i + 1])
    return args, overrides


def main() -> None:
    args, overrides = parse_args()
    parser = ConfigParser()
    parser.read_config(args.config_file)
    parser["output_dir"] = tempfile.mkdtemp(prefix="dino_bench_")
    parser["resume"] = False
    parser["knn_monitor"] = False
    for key, value in overrides.items():
        parser[key] = value
    parser.parse()

    from dae.engine import DinoTrainer  # after the config is parsed: its imports set up the package

    trainer: DinoTrainer = parser.get_parsed_content("trainer")
    device = trainer.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    trainer.model.train()
    done, timed_steps, wait, images = 0, 0, 0.0, 0
    start = None
    while done < args.warmup + args.steps:
        tic = time.perf_counter()
        for batch in trainer.train_loader:
            sync()
            got = time.perf_counter()
            if done == args.warmup:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start, wait, images, timed_steps = got, 0.0, 0, 0
            elif done > args.warmup:
                wait += got - tic
            trainer.train_step(batch)
            sync()
            done += 1
            if done > args.warmup:
                timed_steps += 1
                images += batch["crops"][0].shape[0]
            if done >= args.warmup + args.steps:
                break
            tic = time.perf_counter()
    assert start is not None
    elapsed = time.perf_counter() - start
    memory = peak_memory(device)
    print(
        f"{device_name(device)}: {images / elapsed:.1f} images/s, {elapsed / timed_steps:.3f} s/iter, peak {memory}, "
        f"data wait {wait / elapsed:.1%} over {timed_steps} iterations"
    )
    if args.no_record:
        return
    get = parser.get_parsed_content
    arch = get("arch") + (f"/{get('patch_size')}" if get("arch").startswith("vit") else "")
    crops = f"2x{get('global_crop_size')} + {get('local_crops_number')}x{get('local_crop_size')}"
    row = (
        f"| {datetime.date.today()} | {device_name(device)} | {torch.__version__} / {monai.__version__} "
        f"| {arch} | {crops} "
        f"| {get('out_dim')} | {get('batch_size')} | {get('amp')} | {get('num_workers')} | {images / elapsed:.1f} "
        f"| {elapsed / timed_steps:.3f} | {memory} | {wait / elapsed:.1%} | {args.note or ' '.join(sys.argv[1:])} |\n"
    )
    append_row(TITLE, HEADER, row)


if __name__ == "__main__":
    main()
