"""Throughput and MFU of DINO pretraining (``dino_xray`` bundle) on this machine, or two settings compared.

Builds the student, teacher, loss, optimizer and training loader of the bundle (with any ``--key value``
overrides), runs warm-up iterations, then times ``--steps`` iterations of the real training loop (teacher on
the global crops, student on all crops, loss, backward, per-parameter clipping, step, EMA, and the reading of
the step records every ``log_interval`` iterations) and reports images per second, seconds per iteration, peak
memory, the share of time spent waiting for data, the FLOP per image (all its crops, forward + backward of the
student and forward of the teacher, counted once per architecture and crop set and cached in
``benchmarks/flops_cache.json``), the achieved TFLOP/s and the MFU (see ``benchmarks/flops.py``).
``--compare KEY=A,B`` builds the trainers of both values and times them in alternating blocks of ``--block``
iterations, then prints the step-time ratio B/A. The results are printed and appended as rows to
``benchmarks/results.md`` (not with ``--no_record``).

Examples (GPU)::

    # ViT-S/16, 2 x 224 + 8 x 96 crops (DINO's default multi-crop), 65536 prototypes, bf16: the bundle's overlay
    python benchmarks/dino_throughput.py --config_file bundles/dino_xray/configs/train.yaml \\
        bundles/dino_xray/configs/vit_small16.yaml --batch_size 64 --num_workers 8 --steps 30
    # the same, torch.compile against eager
    python benchmarks/dino_throughput.py --config_file bundles/dino_xray/configs/train.yaml \\
        bundles/dino_xray/configs/vit_small16.yaml --batch_size 64 --num_workers 8 --steps 30 \\
        --compare compile=false,true
    # ResNet-50, the DAX recipe (2 x 224 + 6 x 96, LARS, BN head, 60000 prototypes, fp32)
    python benchmarks/dino_throughput.py --batch_size 64 --num_workers 8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import Benchmark, run
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "dino_xray" / "configs"
TITLE = "## DINO pretraining throughput (`benchmarks/dino_throughput.py`)"
HEADER = (
    "| date | device | torch / monai | arch | crops | out_dim | batch | amp | workers | images/s | s/iter "
    "| TFLOP/image | TFLOP/s | MFU | peak memory | data wait | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)

#: config keys that shape the networks and the crops; the FLOP per image do not depend on the batch size
NETWORK_KEYS = (
    "arch",
    "patch_size",
    "in_chans",
    "global_crop_size",
    "local_crop_size",
    "local_crops_number",
    "out_dim",
    "use_bn_in_head",
    "head_hidden_dim",
    "head_bottleneck_dim",
)


def flop_key(config: ConfigParser, batch: Any) -> dict[str, object]:
    """What the FLOP per image depend on: architecture, head and crops."""
    return {key: config.get_parsed_content(key) for key in NETWORK_KEYS}


def config_cells(config: ConfigParser) -> list[object]:
    get = config.get_parsed_content
    arch = get("arch") + (f"/{get('patch_size')}" if get("arch").startswith("vit") else "")
    return [
        arch,
        f"2x{get('global_crop_size')} + {get('local_crops_number')}x{get('local_crop_size')}",
        get("out_dim"),
        get("batch_size"),
        get("amp"),
        get("num_workers"),
    ]


BENCHMARK = Benchmark(
    name="dino_xray",
    title=TITLE,
    header=HEADER,
    unit="images",
    samples=lambda batch: batch["crops"][0].shape[0],
    flop_key=flop_key,
    config_cells=config_cells,
    fixed={"knn_monitor": False},
)


if __name__ == "__main__":
    run(BENCHMARK, __doc__, [str(CONFIGS / "train.yaml")])
