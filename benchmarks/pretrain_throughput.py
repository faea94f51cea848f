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
CONFIGS = REPO / "bundles" / "dae_pretrain" / "configs"
TITLE = "## DAE pretraining throughput (`benchmarks/pretrain_throughput.py`)"
HEADER = (
    "| date | device | torch / monai | feature_size | roi | crops/iter | amp | workers | samples/s | "
    "s/iter | peak memory | data wait | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
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
    parser["output_dir"] = tempfile.mkdtemp(prefix="dae_bench_")
    parser["resume"] = False
    for key, value in overrides.items():
        parser[key] = value
    parser.parse()

    from dae.engine import PretrainTrainer  # after the config is parsed: its imports set up the package

    trainer: PretrainTrainer = parser.get_parsed_content("trainer")
    device = trainer.device
    loader = trainer.train_loader
    crops_per_iter = parser.get_parsed_content("batch_size") * parser.get_parsed_content("num_samples")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    trainer.model.train()
    done, timed_steps, wait, samples = 0, 0, 0.0, 0
    start = None
    while done < args.warmup + args.steps:
        tic = time.perf_counter()
        for batch in loader:
            sync()
            got = time.perf_counter()
            if done == args.warmup:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start, wait, samples, timed_steps = got, 0.0, 0, 0
            elif done > args.warmup:
                wait += got - tic
            trainer.train_step(batch)
            sync()
            done += 1
            if done > args.warmup:
                timed_steps += 1
                samples += batch["image"].shape[0]
            if done >= args.warmup + args.steps:
                break
            tic = time.perf_counter()
    assert start is not None
    elapsed = time.perf_counter() - start
    # The first timed iteration's data wait is not counted (its batch was fetched before the clock started).
    result = {
        "samples/s": samples / elapsed,
        "s/iter": elapsed / timed_steps,
        "data wait": wait / elapsed,
        "peak memory": peak_memory(device),
    }
    print(
        f"{device_name(device)}: {result['samples/s']:.2f} samples/s, {result['s/iter']:.3f} s/iter, "
        f"peak {result['peak memory']}, data wait {result['data wait']:.1%} over {timed_steps} iterations"
    )
    if args.no_record:
        return
    roi = parser.get_parsed_content("roi_size")
    row = (
        f"| {datetime.date.today()} | {device_name(device)} | {torch.__version__} / {monai.__version__} "
        f"| {parser.get_parsed_content('feature_size')} | {'x'.join(map(str, roi))} | {crops_per_iter} "
        f"| {parser.get_parsed_content('amp')} | {parser.get_parsed_content('num_workers')} "
        f"| {result['samples/s']:.2f} | {result['s/iter']:.3f} | {result['peak memory']} "
        f"| {result['data wait']:.1%} | {args.note or ' '.join(sys.argv[1:])} |\n"
    )
    append_row(TITLE, HEADER, row)


if __name__ == "__main__":
    main()
