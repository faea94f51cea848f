#!/usr/bin/env bash
# The GPU rows of benchmarks/results.md, in one go, on a machine with one GPU (about 10 minutes on an H100/H200
# with a warm flops_cache.json). Run from the repository root with the project installed:
#   bash benchmarks/gpu_rows.sh
# Each command appends its rows to benchmarks/results.md (the device name and versions are in every row).
set -euo pipefail
export PYTHONUNBUFFERED=1
dae=(--feature_size 48 --roi_size "[96,96,96]" --batch_size 2 --num_samples 1 --amp bf16 --num_workers 8)
vits=(--config_file bundles/dino_xray/configs/train.yaml bundles/dino_xray/configs/vit_small16.yaml
  --batch_size 64 --num_workers 8)

# The step reads nothing back from the GPU (torch.cuda.set_sync_debug_mode("error")) and the CUDA paths agree.
python -m pytest -q tests/test_sync_free_step.py tests/test_disruptions.py tests/test_device_augment.py

# Per-parameter ops: the loops they replaced against the foreach versions (ViT-S/16 + 65,536-prototype head).
python benchmarks/step_ops.py --calls 5 --repeats 20

# DAE: Swin UNETR feature_size 48, 96^3, 2 crops per GPU, bf16; then each setting against the default.
python benchmarks/pretrain_throughput.py "${dae[@]}" --steps 30
python benchmarks/pretrain_throughput.py "${dae[@]}" --steps 20 --compare channels_last=false,true \
  --compare fused_adamw=false,true --compare log_interval=1,10
python benchmarks/pretrain_throughput.py "${dae[@]}" --steps 20 --compare compile=false,true

# DINO ViT-S/16, 2 x 224 + 8 x 96 crops, 65,536 prototypes, bf16; the crops' augmentation in the loader or on the GPU.
python benchmarks/dino_throughput.py "${vits[@]}" --steps 30
python benchmarks/dino_throughput.py "${vits[@]}" --steps 20 --compare device_augmentation=false,true \
  --compare fused_adamw=false,true
python benchmarks/dino_throughput.py "${vits[@]}" --steps 20 --compare compile=false,true
