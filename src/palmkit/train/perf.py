"""The machine side of training speed: the allocator setting and the measured matmul peak (the MFU denominator)."""

from __future__ import annotations

import ctypes
import time

import torch


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of unmapping them; True if it took the setting.

    By default a block of more than a few MB goes back to the OS when freed, and the next step touches
    fresh pages: every large activation and gradient is page-faulted in again, a cost measured in
    benchmarks/README.md ("Freed memory kept mapped"). Memory then stays at its peak, which a training run
    reaches anyway.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold, limit = -1, -3, 2**31 - 1  # mallopt takes a C int
    return bool(libc.mallopt(m_mmap_threshold, limit) and libc.mallopt(m_trim_threshold, limit))


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0,
                        device: str | torch.device = "cpu") -> float:
    """Best FLOP/s of an n x n matmul in `dtype` over about `seconds`: the denominator of MFU."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up (and oneDNN/MKL kernel selection)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best
