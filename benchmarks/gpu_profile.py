"""GPU kernel profile of a piece of work (torch profiler): what the benchmarks' `--profile` prints.

`kernels(fn)` runs `fn()` under the profiler and returns its wall time and every kernel (name,
GPU time in µs); `summary` turns the kernels of n steps into busy time, launches and the top
kernels per step. On a CPU the "kernels" are the operators' own CPU time (a smoke test).
"""

from __future__ import annotations

import re
import time

import torch

# kernel families by name (first match wins): what a step's GPU time goes to
FAMILIES = [
    ("attention", r"sdpa|flash|fmha|attention|compute_dot_do_o"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|matmul|xmma|wgmma|convolve"),
    ("optimizer", r"multi_tensor_apply|adam"),
    ("layernorm/softmax/reduce", r"norm|softmax|reduce|red_fused|per_fused"),
    ("elementwise/copy", r"elementwise|poi_fused|copy|fill|cat|index|gather|scatter|memcpy|memset"),
]


def kernels(fn, device: torch.device) -> tuple[float, list[tuple[str, float]]]:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type == kind]
    return wall, [(e.name, e.device_time if cuda else e.self_cpu_time_total) for e in events]


def summary(events: list[tuple[str, float]], n: int, top: int = 8, width: int = 60) -> dict:
    """Per step of n: GPU busy ms, kernel launches, and the `top` kernels [name, launches, ms]."""
    by_name: dict[str, list[float]] = {}
    for name, t in events:
        by_name.setdefault(name[:width], []).append(t)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    family: dict[str, float] = {}
    for name, t in events:
        kind = next((f for f, pattern in FAMILIES if re.search(pattern, name, re.I)), "other")
        family[kind] = family.get(kind, 0.0) + t
    return {
        "ms_per_step_by_family": {k: round(v / n / 1e3, 3) for k, v in sorted(family.items(), key=lambda kv: -kv[1])},
        "gpu_busy_ms_per_step": round(sum(t for _, t in events) / n / 1e3, 3),
        "kernels_per_step": round(len(events) / n, 1),
        "top": [[k, round(len(v) / n, 1), round(sum(v) / n / 1e3, 4)] for k, v in ranked],
    }
