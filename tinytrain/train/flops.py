"""The peak FLOP/s MFU is measured against: a table of GPU datasheet figures, or on a CPU a
measured matrix product (no datasheet figure holds for every CPU and thread count)."""

from __future__ import annotations

import time
from typing import Optional

import torch

# Dense bf16 peak FLOP/s by GPU name (vendor datasheets, without sparsity), for MFU.
PEAK_FLOPS = {
    "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "A100": 312e12, "A10G": 125e12, "L4": 121e12, "L40S": 362e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device_name: str) -> Optional[float]:
    """The bf16 peak of a GPU named like torch.cuda.get_device_name(), or None if unknown."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific name first
        if key in device_name:
            return PEAK_FLOPS[key]
    return None


def _matmul_rate(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest n x n x n matrix product on this CPU, fp32 or bf16, whichever is faster.
    bf16 is timed in full only where a small probe shows it beating fp32 (AMX, AVX512-BF16);
    elsewhere it is emulated and far slower."""
    peak = _matmul_rate(torch.float32, n, repeats)
    if _matmul_rate(torch.bfloat16, 256, 1) > peak / 4:
        peak = max(peak, _matmul_rate(torch.bfloat16, n, repeats))
    return peak
