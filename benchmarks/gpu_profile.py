"""GPU kernel profile of a piece of work (torch profiler): what the benchmarks' `--profile` prints.

`kernels(fn)` runs `fn()` under the profiler and returns its wall time and every kernel (name,
GPU time in µs); `summary` turns the kernels of n steps into busy time, launches and the top
kernels per step. On a CPU the "kernels" are the operators' own CPU time (a smoke test).

`timeline(fn, n)` profiles the host too and says, per step of n, where the wall time goes: GPU
time by kernel family (memcpy/memset apart), the time the GPU is idle (the wall less the union
of the kernels' intervals: launch gaps, the host working or waiting), and on the host the time
spent blocked in synchronising CUDA calls (a device-to-host read such as `nonzero`'s count
waits for every kernel queued before it) and the kernel launches it made.
"""

from __future__ import annotations

import re
import time

import torch

# kernel families by name (first match wins): what a step's GPU time goes to
FAMILIES = [
    ("memcpy/memset", r"^Memcpy|^Memset"),  # the profiler's names for copy-engine work
    ("attention", r"sdpa|flash|fmha|attention|compute_dot_do_o"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|matmul|xmma|wgmma|convolve"),
    ("optimizer", r"multi_tensor_apply|adam"),
    ("layernorm/softmax/reduce", r"norm|softmax|reduce|red_fused|per_fused"),
    ("elementwise/copy", r"elementwise|poi_fused|copy|fill|cat|index|gather|scatter|memcpy|memset"),
]


def _profiled(fn, device: torch.device, activities) -> tuple[float, list]:
    """(wall seconds, the profiler's events) of `fn()` run once under the profiler, the device
    synchronised before and after."""
    from torch.profiler import profile

    cuda = device.type == "cuda"
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    return wall, prof.events()


def kernels(fn, device: torch.device) -> tuple[float, list[tuple[str, float]]]:
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    wall, events = _profiled(fn, device, [ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
    events = [e for e in events if e.device_type == kind]
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


# host-side CUDA runtime calls: those that block until the device catches up, and the launches
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize")
COPY_CALLS = ("cudaMemcpyAsync", "cudaMemcpy", "cuMemcpyDtoHAsync_v2", "cuMemcpyAsync")
ANNOTATIONS = r"Optimizer\.(step|zero_grad)#|ProfilerStep#"  # record_function names torch itself adds
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def _annotation(event) -> bool:
    """A user annotation (a record_function range) rather than a kernel or copy."""
    return bool(getattr(event, "is_user_annotation", False)) or bool(re.match(ANNOTATIONS, event.name))


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def timeline(fn, device: torch.device, n: int, top: int = 12, width: int = 60) -> dict:
    """`fn()` (n steps) under the profiler, host and device: `summary` of its kernels plus, per
    step, the wall time, the GPU's idle time (wall less the union of kernel intervals), the
    host's time blocked in synchronising calls (stream/device syncs and blocking copies) and its
    kernel launches (calls and their own time). On a CPU only the wall time and the operators."""
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    wall, events = _profiled(fn, device, [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    if not cuda:
        ops = [(e.name, e.self_cpu_time_total) for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        return {"wall_ms_per_step": round(wall / n * 1e3, 3), **summary(ops, n, top, width)}
    # record_function ranges (Optimizer.step#Adam.step, ...) come back as device events spanning
    # their kernels too: left out, so that no GPU time counts twice
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not _annotation(e)]
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in gpu])
    sync_us = sum(e.cpu_time_total for e in host if e.name in SYNC_CALLS)
    copy_us = sum(e.cpu_time_total for e in host if e.name in COPY_CALLS)
    launches = [e for e in host if e.name in LAUNCH_CALLS]
    out = summary([(e.name, e.device_time) for e in gpu], n, top, width)
    out.update({
        "wall_ms_per_step": round(wall / n * 1e3, 3),
        "gpu_busy_union_ms_per_step": round(busy_us / n / 1e3, 3),
        "gpu_idle_ms_per_step": round(max(wall * 1e6 - busy_us, 0.0) / n / 1e3, 3),
        "host_sync_calls_per_step": round(sum(e.name in SYNC_CALLS for e in host) / n, 1),
        "host_blocked_ms_per_step": round((sync_us + copy_us) / n / 1e3, 3),
        "host_sync_ms_per_step": round(sync_us / n / 1e3, 3),
        "host_memcpy_call_ms_per_step": round(copy_us / n / 1e3, 3),
        "host_launches_per_step": round(len(launches) / n, 1),
        "host_launch_ms_per_step": round(sum(e.cpu_time_total for e in launches) / n / 1e3, 3),
    })
    return out
