"""Throughput of DAE pretraining for a bundle config on this machine.

Builds the network, loss, disruption, optimizer and training loader of the ``dae_pretrain`` bundle (with
any ``--key value`` overrides), runs warm-up iterations, then times ``--steps`` iterations of the real
training step and reports samples (crops) per second, peak memory and the share of time spent waiting for
data. The result is printed and appended as a row to ``benchmarks/results.md``.

Example (GPU, the issue's reference setting)::

    python benchmarks/pretrain_throughput.py --feature_size 48 --roi_size "[96,96,96]" \
        --batch_size 1 --num_samples 2 --amp bf16 --steps 30
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import monai
import torch
from common import append_row, device_name, parse_args, parse_bundle, peak_memory, time_training

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "dae_pretrain" / "configs"
TITLE = "## DAE pretraining throughput (`benchmarks/pretrain_throughput.py`)"
HEADER = (
    "| date | device | torch / monai | feature_size | roi | crops/iter | amp | workers | samples/s | "
    "s/iter | peak memory | data wait | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def main() -> None:
    args, overrides = parse_args(__doc__, [str(CONFIGS / "train.yaml")])
    parser = parse_bundle(args.config_file, overrides)
    get = parser.get_parsed_content
    trainer = get("trainer")
    timing = time_training(trainer, args.steps, args.warmup, lambda batch: batch["image"].shape[0])
    device, memory = trainer.device, peak_memory(trainer.device)
    print(
        f"{device_name(device)}: {timing.per_second:.2f} samples/s, {timing.per_step:.3f} s/iter, "
        f"peak {memory}, data wait {timing.data_wait:.1%} over {timing.steps} iterations"
    )
    if args.no_record:
        return
    row = (
        f"| {datetime.date.today()} | {device_name(device)} | {torch.__version__} / {monai.__version__} "
        f"| {get('feature_size')} | {'x'.join(map(str, get('roi_size')))} | {get('batch_size') * get('num_samples')} "
        f"| {get('amp')} | {get('num_workers')} | {timing.per_second:.2f} | {timing.per_step:.3f} | {memory} "
        f"| {timing.data_wait:.1%} | {args.note or ' '.join(sys.argv[1:])} |\n"
    )
    append_row(TITLE, HEADER, row)


if __name__ == "__main__":
    main()
