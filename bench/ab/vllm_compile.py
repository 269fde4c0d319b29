"""vLLM generation on CPU, eager (fast_srt's setting) against compiled (`enforce_eager=False`), each in a fresh
process, interleaved: start-up seconds and seconds per batch, plus greedy tokens (the two must agree).

    .venv/bin/python bench/ab/vllm_compile.py --batch 64 --tokens 64 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SEEDS = ["How do I bake bread at home?", "Write a poem about the sea.", "How can I pick a lock?",
         "Explain photosynthesis simply.", "Tell me how to make a fake ID.", "What is the capital of France?",
         "Give me tips for studying.", "How do I hack my neighbour's wifi?"]


def one(mode: str, batch: int, tokens: int, reps: int) -> dict:
    from fast_srt.engine.engine import Engine, SamplingSpec
    from fast_srt.run.models import ensure_default_model

    d = ensure_default_model("bfloat16")
    t0 = time.perf_counter()
    e = Engine(d, dtype="bfloat16", max_model_len=2048, kv_cache_gib=2.0, enforce_eager=mode == "eager")
    start = time.perf_counter() - t0
    tok = e.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": SEEDS[i % len(SEEDS)]}], tokenize=False,
                                       add_generation_prompt=True) for i in range(batch)]
    times = []
    for rep in range(reps):
        t0 = time.perf_counter()
        e.generate(prompts, SamplingSpec(max_tokens=tokens, temperature=1.0, fixed_length=True))
        times.append(round(time.perf_counter() - t0, 2))
    greedy = e.generate(prompts[:2], SamplingSpec(max_tokens=24, temperature=0.0))
    return {"mode": mode, "startup_s": round(start, 1), "generate_s": times,
            "greedy": [g.token_ids for g in greedy]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.batch, a.tokens, a.reps)))
        return
    env = dict(os.environ, FAST_SRT_QUIET="1")
    out = []
    for _ in range(a.rounds):
        for mode in ("eager", "compiled"):
            p = subprocess.run([sys.executable, __file__, "--one", mode, "--batch", str(a.batch), "--tokens",
                                str(a.tokens), "--reps", str(a.reps)], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                sys.exit(p.stderr[-3000:])
            r = json.loads(p.stdout.strip().splitlines()[-1])
            out.append(r)
            print(f"{mode}: start-up {r['startup_s']} s, generate {r['generate_s']} s (first pays warm-up)")
    same = all(r["greedy"] == out[0]["greedy"] for r in out)
    print(f"greedy tokens equal across modes: {same}")


if __name__ == "__main__":
    main()
