"""What a run reports about itself: the throughput per engine phase, and whether the engines really run in this
process (no child processes). The memory plan is fast_srt.run.plan's.
"""

from __future__ import annotations

import os


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


def process_metrics() -> dict:
    """This process's resident memory and open file descriptors now (a long run watches both for leaks)."""
    import psutil

    p = psutil.Process()
    out = {"mem/host_rss_gib": p.memory_info().rss / 2**30}
    try:
        out["proc/open_fds"] = p.num_fds()
    except (AttributeError, psutil.Error):  # no file-descriptor count on this platform
        pass
    return out
