"""Model FLOPs utilisation: achieved model FLOP/s over the accelerator's peak.

The peaks are the vendors' dense tensor-core figures per device (TFLOP/s), by precision; fp32 training runs
its matmuls as TF32 on GPUs that have it (llmtrain turns TF32 on), so fp32 uses the TF32 figure there.
`logger.peak_tflops` overrides the table (e.g. with a measured matmul peak). No peak is known for a CPU.
"""

from __future__ import annotations

import torch

# device-name substring (first match wins, most specific first) → peak TFLOP/s by precision
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 183.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]


def lookup_peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for a device name (as torch.cuda.get_device_name prints it) and precision."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            return peaks.get(precision)
    return None


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU; None when unknown (CPU, or a GPU not in the table)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = lookup_peak_tflops(torch.cuda.get_device_name(device), precision)
    return tflops * 1e12 if tflops is not None else None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float, devices: int) -> float:
    """Model FLOPs utilisation of `devices` devices processing tokens_per_s in all."""
    return flops_per_token * tokens_per_s / (peak * devices)
