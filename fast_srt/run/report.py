"""What a run reports about itself: the memory plan before the first step, the throughput per engine phase, and
whether the engines really run in this process (no child processes).
"""

from __future__ import annotations

import os


def memory_plan(model, ref, engines, cfg) -> str:
    n = sum(p.numel() for p in model.parameters())
    gib = 2**30
    psz = next(model.parameters()).element_size()
    ref_bytes = 0 if ref is None else sum(p.numel() * p.element_size() for p in ref.parameters())
    lines = [f"memory plan ({'cuda' if model.device.type == 'cuda' else 'cpu'}; {n / 1e6:.1f}M parameters):",
             f"  trainer weights {n * psz / gib:6.2f} GiB  grads {n * psz / gib:6.2f} GiB  "
             f"AdamW states {2 * n * 4 / gib:6.2f} GiB",
             f"  reference model {ref_bytes / gib:6.2f} GiB  "
             f"engine weights {n * 2 / gib:6.2f} GiB x {1 + (engines.judge.engine is not engines.policy)} engine(s)",
             f"  KV cache {cfg.model.kv_cache_gib:.2f} GiB per engine"
             f"{' (released while training)' if model.device.type == 'cuda' else ' (host RAM, kept: no sleep on CPU)'}"]
    return "\n".join(lines)


def throughput_lines(engines) -> list[str]:
    """One line per engine phase: sequences, prompt and generated tokens, seconds, throughput."""
    lines = []
    for eng in engines.unique():
        for phase, st in eng.stats.per_phase.items():
            s = st["seconds"]
            lines.append(f"[{phase:8s}] {st['sequences']:4d} seqs  {st['prompt_tokens']:7d} prompt tok  "
                         f"{st['gen_tokens']:6d} gen tok  {s:7.2f} s  {st['gen_tokens'] / max(s, 1e-9):8.1f} gen tok/s  "
                         f"{(st['gen_tokens'] + st['prompt_tokens']) / max(s, 1e-9):8.1f} total tok/s")
    return lines


def child_processes() -> int:
    """Live child processes of this process (from /proc; 0 means the engine runs in this process)."""
    me = str(os.getpid())
    n = 0
    try:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[1] == me:
                            n += 1
                except OSError:
                    pass
    except OSError:
        return -1
    return n
