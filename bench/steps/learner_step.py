"""The learner's half of a training step, without an engine: per-phase seconds, FLOPs and share of the matmul ceiling.

The real learner (fast_srt.learner.step.learner_step: old and reference log-probs, advantages, PPO-clip updates,
the optimizer) runs on synthetic self-play games shaped like the default game's: every attacker prompt starts with
one shared instruction (300 tokens), every defender prompt with another (80 tokens), responses of ragged length up
to --max-resp. The model is a random initialisation of a named architecture (no weights to download), so this runs
where no model hub and no vLLM are (the lent GPU machine). Log-prob implementations given in --impls take turns
step by step on the same learner; the first step of each is a warm-up and is not counted.

Per phase: wall seconds (device synchronized at both ends) and host seconds (until the phase's last op is queued:
a phase whose host time is near its wall time is host-bound). With --count-ops, per step: the ops dispatched
(CPU: fast_srt.learner.op_count, deterministic) or the kernels launched and their summed device time (CUDA:
torch.profiler). MFU: the step's model FLOPs (as `fast-srt bench` counts them) over its wall time and the matmul
ceiling. --attention and --fused force the packed attention kernel and the small ops (e.g. CUDA's one-call path
on CPU, for its op count).

    .venv/bin/python bench/steps/learner_step.py --arch tiny --games 8 --steps 2        # CPU smoke run
    .venv/bin/python bench/steps/learner_step.py --steps 2 --count-ops --attention varlen --fused triton  # CPU ops
    python3 bench/steps/learner_step.py --arch smollm2-135m --games 64 --impls triton,chunked --steps 6   # CUDA

Last stdout line: one JSON object (per-impl phase table, ceiling, peak memory).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fast_srt.commands.bench import linear_params  # noqa: E402
from fast_srt.commands.bench import matmul_ceiling as cpu_matmul_ceiling  # noqa: E402
from fast_srt.run.metrics import PhaseTimer  # noqa: E402

# Public architectures' shapes (config.json values); weights are random.
ARCHS = {
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32, vocab_size=384)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   rope_theta=100000.0)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   rope_theta=1000000.0)),
}


def make_model_dir(arch: str, out: Path, narrow: int = 1) -> Path:
    """A random-init model of `arch` saved in bf16 (what load_policy/load_reference read). narrow > 1 divides the
    hidden and MLP widths (same layers, heads, vocabulary): the same ops dispatch, on narrower tensors, so a CPU
    counts a wide model's ops in a fraction of its time."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    family, shape = ARCHS[arch]
    if narrow > 1:
        heads = shape["num_attention_heads"]
        hidden = max(heads * 8, shape["hidden_size"] // narrow // heads * heads)
        shape = {**shape, "hidden_size": hidden, "intermediate_size": max(8, shape["intermediate_size"] // narrow),
                 "head_dim": hidden // heads}
    cls = LlamaConfig if family == "llama" else Qwen2Config
    cfg = cls(max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def synthetic_samples(n_games: int, vocab: int, max_resp: int, seed: int, group: int):
    """Both roles' samples of n_games games: shared role instructions, ragged requests and responses."""
    from fast_srt.learner.batch import Sample

    r = random.Random(seed)
    ids = lambda n: [r.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    pre_att, pre_def = ids(300), ids(80)
    out = []
    for i in range(n_games):
        request = ids(r.randint(15, 60))
        attack = ids(r.randint(16, max_resp))
        answer = ids(r.randint(16, max_resp))
        reward = r.choice([-1.0, 1.0])
        meta = {"group": i // group}
        out.append(Sample(pre_att + request, attack, "attacker", reward,
                          [-r.random() * 3 for _ in attack], dict(meta)))
        out.append(Sample(pre_def + attack, answer, "defender", -reward,
                          [-r.random() * 3 for _ in answer], dict(meta)))
    return out


def matmul_ceiling(device: torch.device, dtype: torch.dtype, hidden: int) -> float:
    """The ceiling the shares are taken against: on CPU `fast-srt bench`'s ([2048, H] x [H, 4H]); on CUDA the best
    of 10 timed 8192^3 matmuls (a small model's shapes would not fill the chip)."""
    if device.type != "cuda":
        return cpu_matmul_ceiling(hidden, dtype)
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * 8192**3 / best


def profiled(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=acts)


def write_profile(prof, device: torch.device, path: str, impl: str) -> None:
    """The profiled step's top ops by self device time (CUDA) and by self CPU time, with launch counts."""
    ka = prof.key_averages()
    parts = [f"profiled step: impl {impl}, {device.type}\n"]
    if device.type == "cuda":
        parts.append(ka.table(sort_by="self_cuda_time_total", row_limit=30))
    parts.append(ka.table(sort_by="self_cpu_time_total", row_limit=30))
    Path(path).write_text("\n".join(parts))
    print(f"profile: {path}", flush=True)


class PhaseClock:
    """PhaseTimer's synchronized wall seconds per phase, plus host seconds: from the phase's start to the moment its
    last op was queued (before the closing synchronize)."""

    def __init__(self, device: torch.device):
        self.timer = PhaseTimer(torch.cuda.synchronize if device.type == "cuda" else None)
        self.host: dict[str, float] = {}

    @property
    def seconds(self) -> dict[str, float]:
        return self.timer.seconds

    @contextlib.contextmanager
    def __call__(self, phase: str):
        with self.timer(phase):
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.host[phase] = self.host.get(phase, 0.0) + time.perf_counter() - t0


def step_counter(device: torch.device, count: bool, prof=None):
    """(context, read): read() after the context gives the step's dispatched ops (CPU) or its kernel launches and
    their device seconds (CUDA: from `prof`, the --profile step's profiler), {} when not counted."""
    if not count:
        return contextlib.nullcontext(), dict
    if device.type == "cuda":  # the profiled step only: a profiler on every step would slow the timed ones
        return contextlib.nullcontext(), (lambda: cuda_launches(prof)) if prof is not None else dict
    from fast_srt.learner.op_count import OpCounter

    counter = OpCounter()
    return counter, lambda: {"ops": counter.launches, "ops_all": counter.total}


def cuda_launches(prof) -> dict:
    """Kernels launched in a profiled step and their summed device time (a GPU's busy time, overlaps aside)."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return {"launches": len(kernels), "device_s": round(sum(e.device_time for e in kernels) / 1e6, 4)}


def build_learner(model_dir: Path, cfg, device: torch.device, impl: str, fused: str | None = None):
    from fast_srt.kernels import select_advantages_impl
    from fast_srt.learner.policy import VARLEN_SDPA, build_optimizer, build_scheduler, load_policy, load_reference
    from fast_srt.learner.step import Learner, pick_logprob_impl, total_updates

    compute = getattr(torch, cfg.model.dtype)
    attn = VARLEN_SDPA if cfg.optim.share_prefix else None
    model = load_policy(str(model_dir), dtype=torch.float32, device=device, attn=attn, fused=fused)
    ref = load_reference(str(model_dir), compute, device, attn=attn, fused=fused) if cfg.algo.kl_coef > 0 else None
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    n = total_updates(cfg)
    return Learner(cfg=cfg, model=model, ref=ref, optimizer=optimizer,
                   scheduler=build_scheduler(optimizer, n, 0, cfg.optim.min_lr_ratio),
                   scaler=torch.amp.GradScaler(device.type, enabled=compute == torch.float16),
                   autocast=lambda: torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32),
                   logprob_fn=pick_logprob_impl(impl, device), adv_fns=select_advantages_impl(device),
                   device=device, temperature=cfg.sampling.temperature, sft_stream=None, total_updates=n)


def summarize(per_impl: dict[str, list[dict]], lin: int, head: int, ceiling: float) -> dict:
    """Per impl: median seconds of each phase (wall and host) over its timed steps (the first is a warm-up), the
    log-prob and train phases' share of the matmul ceiling and the step's MFU (FLOPs as `fast-srt bench` counts
    them), train tokens per second, and the step's ops or kernel launches when counted."""
    table = {}
    for name, rows in per_impl.items():
        timed = rows[1:] or rows  # one step: counts only, its times include the warm-up
        keys = dict.fromkeys(k for r in timed for k in r if k not in ("impl", "step"))
        med = {k: statistics.median(r[k] for r in timed if k in r) for k in keys}  # counts: the counted steps
        lp_flops = 2 * lin * med["logprob_rows"] + 2 * head * med["logprob_loss"]
        tr_flops = 6 * lin * med["train_rows"] + 6 * head * med["loss_tokens"]  # each sample trained once a step
        table[name] = {
            "step_s": med["step_s"], "logprob_s": med.get("logprob_s"), "advantage_s": med.get("advantage_s"),
            "train_s": med.get("train_s"),
            **{k: med[k] for k in med if k.startswith("host_") or k in ("ops", "ops_all", "launches", "device_s")},
            "logprob_share": round(lp_flops / med["logprob_s"] / ceiling, 3) if med.get("logprob_s") else None,
            "train_share": round(tr_flops / med["train_s"] / ceiling, 3) if med.get("train_s") else None,
            "mfu": round((lp_flops + tr_flops) / med["step_s"] / ceiling, 3),
            "train_tokens_per_s": round(med["train_rows"] / med["train_s"]) if med.get("train_s") else None,
        }
    return table


def report_lines(table: dict) -> list[str]:
    """The markdown table of `summarize`'s result."""
    lines = ["| impl | step s | host s (logprob / train) | logprob s | train s | ops / launches | device s | "
             "logprob share | train share | MFU | train tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in table.items():
        host = f"{t.get('host_logprob_s', 0):.3f} / {t.get('host_train_s', 0):.3f}"
        count = t.get("ops", t.get("launches", ""))
        lines.append(f"| {name} | {t['step_s']:.3f} | {host} | {t['logprob_s']:.3f} | {t['train_s']:.3f} | "
                     f"{count} | {t.get('device_s', '')} | {t['logprob_share']} | {t['train_share']} | {t['mfu']} | "
                     f"{t['train_tokens_per_s']} |")
    return lines


def main() -> None:
    from fast_srt.config import TrainConfig
    from fast_srt.learner.step import learner_step, pick_logprob_impl

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="smollm2-135m", choices=sorted(ARCHS))
    p.add_argument("--games", type=int, default=64)
    p.add_argument("--max-resp", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="steps per impl, the first a warm-up (1: counts only)")
    p.add_argument("--narrow", type=int, default=1,
                   help="divide the hidden and MLP widths by this (op counts on CPU; they do not depend on widths)")
    p.add_argument("--impls", default="auto", help="comma-separated logprob_impl names, taking turns")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--estimator", default="reinforce_pp", choices=["reinforce_pp", "grpo", "rloo"])
    p.add_argument("--updates-per-step", type=int, default=2)
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--report", default="", help="also write a markdown report here")
    p.add_argument("--profile", default="", help="profile the last step (torch.profiler) and write its top ops here")
    p.add_argument("--count-ops", action="store_true",
                   help="count each step's dispatched ops (CPU), or the profiled step's kernel launches (CUDA, "
                        "with --profile)")
    p.add_argument("--attention", default="auto", choices=["auto", "per_piece", "varlen", "masked", "flash_attn"],
                   help="force the packed attention kernel (auto: the device's choice)")
    p.add_argument("--fused", default="auto", choices=["auto", "torch", "triton"],
                   help="force the small ops (auto: fused Triton on CUDA, torch on CPU)")
    args = p.parse_args()
    if args.count_ops and torch.cuda.is_available() and not args.profile:
        p.error("--count-ops on CUDA counts the profiled step's launches: give --profile FILE")
    if args.steps < 2 and not (args.steps == 1 and args.count_ops):
        p.error("--steps must be >= 2 (the first step of each impl is a warm-up), or 1 with --count-ops")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spp = 1 if args.estimator == "reinforce_pp" else 2
    base = TrainConfig()
    cfg = dataclasses.replace(
        base, model=dataclasses.replace(base.model, dtype=args.dtype),
        algo=dataclasses.replace(base.algo, estimator=args.estimator, samples_per_prompt=spp),
        optim=dataclasses.replace(base.optim, updates_per_step=args.updates_per_step,
                                  micro_batch_tokens=args.micro_batch_tokens))
    impls = [x for x in args.impls.split(",") if x]
    if args.attention != "auto":
        from fast_srt.learner import attention

        attention.FORCED_KERNEL = args.attention
    fused = None if args.fused == "auto" else args.fused
    with tempfile.TemporaryDirectory(prefix="fast_srt_learner_") as tmp:
        model_dir = make_model_dir(args.arch, Path(tmp) / "model", args.narrow)
        config = json.loads((model_dir / "config.json").read_text())
        lin, head = linear_params(config)
        learner = build_learner(model_dir, cfg, device, impls[0], fused)
        fns = {name: pick_logprob_impl(name, device) for name in impls}
        ceiling = matmul_ceiling(device, getattr(torch, args.dtype), config["hidden_size"])
        per_impl: dict[str, list[dict]] = {name: [] for name in impls}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step in range(args.steps * len(impls)):
            name = impls[step % len(impls)]
            learner.logprob_fn = fns[name]
            samples = synthetic_samples(args.games, config["vocab_size"], args.max_resp, seed=step, group=spp)
            timer = PhaseClock(device)
            last = step == args.steps * len(impls) - 1
            prof = profiled(device) if args.profile and last else None
            counting, read_count = step_counter(device, args.count_ops, prof)
            with prof if prof is not None else contextlib.nullcontext(), counting:
                t0 = time.perf_counter()
                m = learner_step(learner, step, samples, timer)
                timer.seconds["step"] = time.perf_counter() - t0
            if prof is not None:
                write_profile(prof, device, args.profile, name)
            row = {"impl": name, "step": step, **{f"{k}_s": round(v, 3) for k, v in timer.seconds.items()},
                   **{f"host_{k}_s": round(v, 3) for k, v in timer.host.items()}, **read_count(),
                   "logprob_rows": m["tokens/logprob_rows"], "logprob_loss": m["tokens/logprob_loss"],
                   "train_rows": m.get("tokens/train_rows", 0), "loss_tokens": sum(len(s.response_ids)
                                                                                   for s in samples)}
            per_impl[name].append(row)
            print(json.dumps(row), flush=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    table = summarize(per_impl, lin, head, ceiling)
    head_line = (f"learner step, {args.arch} (random init{f', widths / {args.narrow}' if args.narrow > 1 else ''}), {args.games} games ({2 * args.games} samples, "
                 f"responses <= {args.max_resp}), {args.dtype}, {args.estimator}, {args.updates_per_step} updates, "
                 f"micro-batch {args.micro_batch_tokens} tokens, on {device.type} "
                 f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}); matmul ceiling "
                 f"{ceiling / 1e12:.1f} TFLOP/s; peak {peak if peak is None else round(peak, 2)} GiB; medians over "
                 f"steps 2-{args.steps} of each impl")
    lines = [head_line, f"attention {args.attention}, small ops {args.fused}", "", *report_lines(table)]
    text = "\n".join(lines)
    print(text)
    if args.report:
        Path(args.report).write_text(f"# Learner step\n\nCommand: `python bench/steps/learner_step.py "
                                     f"{' '.join(sys.argv[1:])}`\n\n{text}\n")
    print(json.dumps({"arch": args.arch, "device": device.type, "ceiling_tflops": round(ceiling / 1e12, 2),
                      "peak_gib": peak, "impls": table}))


if __name__ == "__main__":
    main()
