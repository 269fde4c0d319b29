"""Shared bench helpers: interleaved timing with p20/p50/p80, peak-memory probes, report rows.

Timing: providers are timed round-robin inside one process (rep 1 of every provider, then rep 2, ...), so
ratios are measured side by side even when another process competes for the CPU.

Peak memory on CPU: torch's CPU allocator keeps no peak statistics, and tracemalloc does not see torch
allocations. Each (provider, shape, mode) runs once in a FRESH subprocess that allocates its inputs, resets the
kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), runs one call and reads VmHWM from
/proc/self/status: extra = VmHWM - VmRSS before the call. It counts every page touched by the call, outputs and
gradients included. On CUDA, torch.cuda.max_memory_allocated() is used instead.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class BenchRow:
    op: str
    provider: str
    mode: str
    shape: str
    p20_ms: float
    p50_ms: float
    p80_ms: float
    extra_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def percentiles(times_s: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times_s, dtype=torch.float64) * 1e3
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_interleaved(fns: dict, reps: int, warmup: int = 1, sync=None) -> dict[str, list[float]]:
    """Round-robin timing: returns {name: [seconds per rep]}. `sync` (e.g. torch.cuda.synchronize) after each."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_mib(fn) -> float:
    """Run fn once; return the peak RSS above the RSS before the call, in MiB (CPU) or allocator peak (CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def run_child(script: str, args: list[str]) -> dict:
    """Run `python script args` in a fresh process; its last stdout line is a JSON object."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        sha = ""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine())
    return {
        "device": dev,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git_sha": sha,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "loadavg_1m": os.getloadavg()[0],
    }


def print_table(rows: list[BenchRow]) -> None:
    head = (f"{'op':<18}{'provider':<10}{'mode':<9}{'shape':<22}{'p20 ms':>11}{'p50 ms':>11}{'p80 ms':>11}"
            f"{'extra MiB':>11}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        mem = "" if r.extra_mib is None else f"{r.extra_mib:.1f}"
        print(f"{r.op:<18}{r.provider:<10}{r.mode:<9}{r.shape:<22}{r.p20_ms:>11.2f}{r.p50_ms:>11.2f}{r.p80_ms:>11.2f}"
              f"{mem:>11}  {r.note}")


def markdown_table(rows: list[BenchRow]) -> str:
    lines = ["| op | provider | mode | shape | p20 ms | p50 ms | p80 ms | extra MiB | note |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        mem = "" if r.extra_mib is None else f"{r.extra_mib:.1f}"
        lines.append(f"| {r.op} | {r.provider} | {r.mode} | {r.shape} | {r.p20_ms:.2f} | {r.p50_ms:.2f} | "
                     f"{r.p80_ms:.2f} | {mem} | {r.note} |")
    return "\n".join(lines)


def final_json(op: str, rows: list[BenchRow], summary: dict) -> str:
    return json.dumps({"op": op, "env": environment(), "summary": summary, "rows": [asdict(r) for r in rows]})
