"""Throughput and MFU of DAE pretraining (``dae_pretrain`` bundle) on this machine, or two settings compared.

Builds the network, loss, disruption, optimizer and training loader of the bundle (with any ``--key value``
overrides), runs warm-up iterations, then times ``--steps`` iterations of the real training loop (disruption,
forward, losses, backward, clipping, optimizer step, and the reading of the step records every
``log_interval`` iterations) and reports samples (crops) per second, seconds per iteration, peak memory, the
share of time spent waiting for data, the FLOP per sample (forward + backward, counted once per network and
batch shape and cached in ``benchmarks/flops_cache.json``), the achieved TFLOP/s and the MFU (see
``benchmarks/flops.py``). ``--compare KEY=A,B`` builds the trainers of both values and times them in
alternating blocks of ``--block`` iterations, then prints the step-time ratio B/A. The results are printed and
appended as rows to ``benchmarks/results.md`` (not with ``--no_record``).

Examples (GPU; the issue's reference setting: feature_size 48, 96^3 crops, 2 crops per iteration, bf16)::

    python benchmarks/pretrain_throughput.py --feature_size 48 --roi_size "[96,96,96]" \\
        --batch_size 2 --num_samples 1 --amp bf16 --num_workers 8 --steps 30
    # the same, torch.compile against eager, then channels-last against the default layout
    python benchmarks/pretrain_throughput.py --feature_size 48 --roi_size "[96,96,96]" \\
        --batch_size 2 --num_samples 1 --amp bf16 --num_workers 8 --steps 30 --compare compile=false,true
    python benchmarks/pretrain_throughput.py --feature_size 48 --roi_size "[96,96,96]" \\
        --batch_size 2 --num_samples 1 --amp bf16 --num_workers 8 --steps 30 --compare channels_last=false,true

Example (CPU, the embedded demo's tiny network)::

    python benchmarks/pretrain_throughput.py --config_file bundles/dae_pretrain/configs/train.yaml \\
        bundles/dae_pretrain/configs/demo.yaml --steps 5
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import Benchmark, run
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "dae_pretrain" / "configs"
TITLE = "## DAE pretraining throughput (`benchmarks/pretrain_throughput.py`)"
HEADER = (
    "| date | device | torch / monai | feature_size | roi | crops/iter | amp | workers | samples/s | s/iter "
    "| TFLOP/sample | TFLOP/s | MFU | peak memory | data wait | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)

#: config keys that shape the network or the backward pass (frozen parts and a disabled contrastive head)
NETWORK_KEYS = (
    "feature_size",
    "depths",
    "num_heads",
    "window_size",
    "use_v2",
    "use_checkpoint",
    "proj_hidden_dim",
    "proj_dim",
    "mm_con",
    "encoder_off",
    "decoder_off",
)


def flop_key(config: ConfigParser, batch: Any) -> dict[str, object]:
    """What the FLOP per crop depend on: the network's shape and the batch's (crops, channels, roi)."""
    return {
        **{key: config.get_parsed_content(key) for key in NETWORK_KEYS},
        "batch_shape": list(batch["image"].shape),
    }


def config_cells(config: ConfigParser) -> list[object]:
    get = config.get_parsed_content
    return [
        get("feature_size"),
        "x".join(map(str, get("roi_size"))),
        get("batch_size") * get("num_samples"),
        get("amp"),
        get("num_workers"),
    ]


BENCHMARK = Benchmark(
    name="dae_pretrain",
    title=TITLE,
    header=HEADER,
    unit="samples",
    samples=lambda batch: batch["image"].shape[0],
    flop_key=flop_key,
    config_cells=config_cells,
)


if __name__ == "__main__":
    run(BENCHMARK, __doc__, [str(CONFIGS / "train.yaml")])
