"""The memory plan: what each phase of a step holds on the device, from the model shapes and the run's settings.

Pure arithmetic on config.json shapes (no weights loaded), so it answers for models that are not on this machine.
`fast-srt plan` prints it; `fast-srt train` prints the same plan from the same code before the first step.

What each phase holds (bytes; P = parameters, P_lin = parameters of the decoder's linear layers, b = bytes of the
compute dtype, T = tokens of one micro-batch):
- resident all step: the engines' weights (P x b each; the policy's base model as judge shares the policy engine
  in `play`, and with a LoRA adapter served by the engine, whose two copies of the adapter count too), the
  trainer's weights (full fine-tuning: fp32 master copy, 4P; LoRA: the frozen base as the trainer holds it, see
  `trainer_weights`, plus fp32 adapters: one per role with --roles per-role, `adapters`), AdamW's two fp32
  moments (8 x trainable), and the frozen KL reference
  (full fine-tuning with kl_coef > 0: linears in the compute dtype, the rest fp32, as `load_reference` builds it).
- generation: + the policy engine's KV cache (its budget, `kv_cache_gib`) and its prefill workspace.
- judging: + the judge engine's KV cache and workspace.
- training: + fp32 gradients of the trainable parameters, autocast's compute-dtype copies of the linear weights
  (b x P_lin, full fine-tuning), the activations autograd keeps for one micro-batch, and the log-prob kernel's
  buffers. On CUDA the engines' KV caches are released while training (sleep mode); on CPU they stay.

Several ranks (`ranks`): each rank holds its own engines and its share of the games. With `shard` "fsdp2" the
trainer's weights, gradients, AdamW's moments and the KL reference are split over the ranks (1/N each), and
training adds what FSDP2 gathers whole: the root (embedding, output head, final norm) and two decoder layers
(the one running and the next) in fp32, with their fp32 gradients before the reduce-scatter. Not split: the
engines and their KV caches, the activations, the log-prob kernel's buffers and autocast's compute-dtype copies of
the linear weights, which autograd keeps for the backward of every layer (measured on CPU under bf16 autocast:
the copies of the whole model's linears are saved, sharded or not).

The eval during training (`--eval-every`, fast_srt/eval/training.py) adds, resident all run, the frozen base
defender's engine when no engine of the run holds the base model for generation (`eval_defender_placement`): its
weights and its EVAL_KV_CACHE_GIB KV cache; and the sentence embedder of the attack diversity (fp32).

Activations: `act_per_token_layer` bytes per token and layer without gradient checkpointing (what each layer saves
for its backward, counted tensor by tensor); with checkpointing, each layer's fp32 input (4H) plus one layer's
full set while it is recomputed. Checked against measured peaks on CPU: bench/checks/plan_vs_measured.py and
tests/run/test_plan.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    @classmethod
    def from_config(cls, name: str, c: dict) -> ModelShape:
        heads = int(c["num_attention_heads"])
        return cls(name=name, vocab=int(c["vocab_size"]), hidden=int(c["hidden_size"]),
                   layers=int(c["num_hidden_layers"]), heads=heads,
                   kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
                   intermediate=int(c["intermediate_size"]), tied=bool(c.get("tie_word_embeddings", False)))

    @property
    def linear_params(self) -> int:
        """q, k, v, o and the three MLP projections of every layer."""
        h, d = self.hidden, self.head_dim
        per_layer = h * self.heads * d * 2 + h * self.kv_heads * d * 2 + 3 * h * self.intermediate
        return self.layers * per_layer

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_params + embed + head + norms

    def kv_bytes_per_token(self, b: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * b

    def lora_params(self, rank: int) -> int:
        """Rank-r A and B on all seven linear layers of every layer (the default lora_targets)."""
        h, d, i = self.hidden, self.head_dim, self.intermediate
        shapes = [(h, self.heads * d), (h, self.kv_heads * d), (h, self.kv_heads * d), (self.heads * d, h),
                  (h, i), (h, i), (i, h)]
        return self.layers * sum(rank * (a + b) for a, b in shapes)


def _llama(name, vocab, hidden, layers, heads, kv, inter, tied=False, head_dim=None):
    return ModelShape(name, vocab, hidden, layers, heads, kv, head_dim or hidden // heads, inter, tied)


# Shapes of the paper-scale models (from their published config.json), for planning without the weights.
KNOWN: dict[str, ModelShape] = {s.name: s for s in [
    _llama("meta-llama/Llama-3.1-8B-Instruct", 128256, 4096, 32, 32, 8, 14336),
    _llama("mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated", 128256, 4096, 32, 32, 8, 14336),
    _llama("meta-llama/Llama-3.1-70B-Instruct", 128256, 8192, 80, 64, 8, 28672),
    _llama("meta-llama/Llama-Guard-3-8B", 128256, 4096, 32, 32, 8, 14336),
    _llama("allenai/wildguard", 32768, 4096, 32, 32, 8, 14336),  # Mistral-7B-v0.3
    _llama("Qwen/Qwen2.5-7B-Instruct", 152064, 3584, 28, 28, 4, 18944),
    _llama("Qwen/Qwen2.5-1.5B-Instruct", 151936, 1536, 28, 12, 2, 8960, tied=True),
    _llama("HuggingFaceTB/SmolLM2-135M-Instruct", 49152, 576, 30, 9, 3, 1536, tied=True),
]}
SIZES = {"8b": "meta-llama/Llama-3.1-8B-Instruct", "70b": "meta-llama/Llama-3.1-70B-Instruct",
         "7b": "Qwen/Qwen2.5-7B-Instruct", "1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
         "135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def resolve_shape(spec: str) -> ModelShape:
    """A model's shape: a size ("8b"), a known hub id, a local HF directory, or `default`."""
    from fast_srt.errors import UserError

    if spec.lower() in SIZES:
        return KNOWN[SIZES[spec.lower()]]
    if spec in KNOWN:
        return KNOWN[spec]
    if spec == "default":
        return KNOWN["HuggingFaceTB/SmolLM2-135M-Instruct"]
    cfg = Path(spec) / "config.json"
    if cfg.is_file():
        return ModelShape.from_config(spec, json.loads(cfg.read_text()))
    raise UserError(f"plan: no shape for model {spec!r}: give a size ({', '.join(SIZES)}), a local HF directory "
                    f"with config.json, or one of: {', '.join(KNOWN)}")


def act_per_token_layer(s: ModelShape, b: int, lora: bool = False) -> int:
    """Bytes autograd keeps per token and decoder layer under autocast, no checkpointing (H hidden, I MLP width,
    K = kv heads x head dim; fp32 residual stream, compute dtype of b bytes):
      two RMSNorms in fp32, each its input and normalised output:            2 x 8H
      the compute-dtype casts of the matmul inputs (q, k, v; gate, up):      b x (3H + 2H)
      RoPE's saved q, rotate_half(q), k, rotate_half(k):                     b x (2H + 2K)
      attention's q, k, v and output, the o-projection's input:              b x (3H + 2K)
      the MLP's gate and up outputs, silu(gate), their product (down input): b x 4I
    With LoRA on the seven projections, each adapter keeps its own cast of the input: b x (6H + I) more."""
    h, k, i = s.hidden, s.kv_heads * s.head_dim, s.intermediate
    out = 2 * 8 * h + b * (5 * h + 2 * h + 2 * k + 3 * h + 2 * k + 4 * i)
    return out + (b * (6 * h + i) if lora else 0)


EVAL_KV_CACHE_GIB = 0.25  # the eval's frozen-defender engine: a few short sequences at a time
SENTENCE_EMBEDDER_PARAMS = 22_713_216  # all-MiniLM-L6-v2 (fast_srt.eval.diversity), held in fp32


def eval_defender_placement(cfg) -> str | None:
    """Where the eval during training's frozen base defender (the original base model, before any warm-up) runs:
    None without the eval; "frozen_defender": attacker_only's, which is that model; "policy_base": the policy
    engine's base weights, when it serves a LoRA adapter on the original base model (no warm-up); else
    "own_engine", one more engine (the probe judge's engine holds the base model but pools, it cannot generate)."""
    if not cfg.eval_every:
        return None
    if cfg.game.mode == "attacker_only":
        return "frozen_defender"
    if cfg.lora_rank and cfg.lora_in_engine and not cfg.warmup.steps:
        return "policy_base"
    return "own_engine"


@dataclass
class PlanInput:
    policy: ModelShape
    judge: ModelShape | None = None  # None: the policy's base model
    lora_rank: int = 0
    dtype_bytes: int = 2
    games_per_step: int = 16
    prompt_tokens: int = 320  # longest prompt of a turn (the attacker instruction + seed)
    max_new_tokens: int = 128
    judge_prompt_tokens: int = 640
    micro_batch_tokens: int = 4096
    gradient_checkpointing: bool = False
    kl: bool = True
    kv_cache_gib: float | None = None  # None: what the batch needs
    judge_kv_cache_gib: float | None = None
    device: str = "cuda"
    budget_gib: float = 80.0
    trains: bool = True
    lora_base_in_compute_dtype: bool = True  # what the trainer does (learner/lora.py: base_to_compute_dtype)
    lora_in_engine: bool = True  # LoRA: the policy engine serves the adapter on the base (the base judge shares it)
    adapters: int = 1  # LoRA adapters trained (2: one per role, --roles per-role), each with gradients and moments
    engine_adapters: int = 1  # LoRA adapters the policy engine serves side by side
    ranks: int = 1  # torchrun ranks: each holds all of the plan on its own device, with games_per_step / ranks games
    shard: str = "none"  # "fsdp2": the trainer's weights, gradients, moments and reference split over the ranks
    eval_engine: bool = False  # the eval during training's own frozen-defender engine (eval_defender_placement)
    eval_embedder: bool = False  # the eval's sentence embedder


@dataclass
class Phase:
    name: str
    parts: dict[str, float] = field(default_factory=dict)  # GiB

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def kv_need_gib(shape: ModelShape, sequences: int, tokens: int, b: int) -> float:
    return sequences * tokens * shape.kv_bytes_per_token(b) / GIB


def engine_workspace_gib(shape: ModelShape, b: int, batched_tokens: int = 8192) -> float:
    """vLLM's forward workspace for one scheduler step of `batched_tokens` (activations of one layer, the
    sampler's logits for up to 256 sequences); an estimate, small beside weights and KV."""
    return (batched_tokens * (4 * shape.hidden + 2 * shape.intermediate) * b
            + 256 * shape.vocab * 4) / GIB


def shards(p: PlanInput) -> int:
    """The number of ranks the trainer's state is split over (1: replicated)."""
    return p.ranks if p.shard == "fsdp2" else 1


def _sharded(name: str, p: PlanInput) -> str:
    return name if shards(p) == 1 else f"{name}, 1/{shards(p)} per rank"


def fsdp2_gathered_gib(p: PlanInput) -> float:
    """What FSDP2 holds whole while training: the root's parameters and two decoder layers' (the one running, the
    next one gathered ahead), fp32, plus the fp32 gradients of the root and one layer before their reduce-scatter."""
    s = p.policy
    layer = s.linear_params // s.layers + 2 * s.hidden
    root = s.params - s.layers * layer
    return 4 * (root + 2 * layer + root + layer) / GIB


def trainer_weights_gib(p: PlanInput) -> dict[str, float]:
    s, b = p.policy, p.dtype_bytes
    if not p.lora_rank:
        out = {_sharded("trainer weights (fp32 master)", p): 4 * s.params / shards(p) / GIB}
        if p.kl:
            rest = s.params - s.linear_params
            out[_sharded("KL reference (linears in compute dtype)", p)] = \
                (b * s.linear_params + 4 * rest) / shards(p) / GIB
        return out
    base_b = b if p.lora_base_in_compute_dtype else 4
    return {f"trainer base weights ({'compute dtype' if base_b == b else 'fp32'} linears, frozen)":
            (base_b * s.linear_params + 4 * (s.params - s.linear_params)) / GIB,
            "LoRA adapters (fp32" + (f", {p.adapters}: one per role)" if p.adapters > 1 else ")"):
            4 * trainable_params(p) / GIB}


def trainable_params(p: PlanInput) -> int:
    """Parameters with gradients and AdamW moments: every adapter's (LoRA), else the whole model's."""
    return p.adapters * p.policy.lora_params(p.lora_rank) if p.lora_rank else p.policy.params


def activations_gib(p: PlanInput) -> float:
    s, b, t = p.policy, p.dtype_bytes, p.micro_batch_tokens
    per_layer = act_per_token_layer(s, b, lora=p.lora_rank > 0)
    if p.gradient_checkpointing:
        return (t * s.layers * 4 * s.hidden + t * per_layer) / GIB
    return t * s.layers * per_layer / GIB


def logprob_buffers_gib(p: PlanInput, tile_elems: int = 3 * 2**21) -> float:
    """The log-prob kernel: the [V, H] fp32 head gradient, the [N, H] hidden states and their gradient, and its
    logits buffers. CPU: two fp32 tiles of at most `tile_elems` (the torch twin's chunk), and the C++ op's [N, V]
    fp32 logits kept for the backward when they fit its cap (kernels/native.py). CUDA (the Triton path): one chunk
    of fp32 logits (kernels.logprobs.FUSED_CHUNK_BYTES at most); the trainer's head is fp32 (master weights), so
    its gradient is summed over the chunks in place."""
    s, n = p.policy, p.micro_batch_tokens
    if p.device == "cuda":
        from fast_srt.kernels.logprobs import _fused_chunk_rows  # (imports torch: only where it runs)

        tiles = _fused_chunk_rows(n, s.vocab) * s.vocab * 4
    else:
        tiles = 2 * min(n * s.vocab, tile_elems) * 4
    if p.device == "cpu":
        from fast_srt.kernels.native import STORE_LOGITS_MAX_BYTES  # (imports torch: only where it runs)

        if n * s.vocab * 4 <= STORE_LOGITS_MAX_BYTES:
            tiles += n * s.vocab * 4
    return (tiles + s.vocab * s.hidden * 4 + 2 * n * s.hidden * 4) / GIB


# The trainer process's fixed cost beyond its tensors: on CPU the allocator's caches, thread pools and the
# libraries' workspaces, measured as the tiny model's peak minus its counted parts (bench/checks/plan_vs_measured.py:
# 0.15 GiB); on CUDA the context and the caching allocator's slack, an estimate (not yet measured here).
RUNTIME_OVERHEAD_GIB = {"cpu": 0.15, "cuda": 0.75}


def plan(p: PlanInput) -> list[Phase]:
    s, b = p.policy, p.dtype_bytes
    judge = p.judge or s
    seq_tokens = p.prompt_tokens + p.max_new_tokens
    games = max(1, p.games_per_step // p.ranks)  # this rank's share of the batch
    kv_policy = p.kv_cache_gib if p.kv_cache_gib is not None else kv_need_gib(s, games, seq_tokens, b)
    judge_tokens = p.judge_prompt_tokens + 32
    kv_judge = (p.judge_kv_cache_gib if p.judge_kv_cache_gib is not None
                else kv_need_gib(judge, 2 * games, judge_tokens, b))
    adapter_in_engine = p.trains and p.lora_rank > 0 and p.lora_in_engine
    shared_engine = p.judge is None and (not p.trains or adapter_in_engine)  # the judge reads the base weights
    resident = {"policy engine weights": b * s.params / GIB,
                "runtime overhead": RUNTIME_OVERHEAD_GIB.get(p.device, 0.75)}
    if adapter_in_engine:  # vLLM holds the adapter twice: its adapter cache and the active slot's stacked buffers
        n = p.engine_adapters
        resident["policy engine LoRA adapter" + (f"s ({n}, cache + slot each)" if n > 1 else " (cache + slot)")] = \
            2 * n * b * s.lora_params(p.lora_rank) / GIB
    if not shared_engine:
        resident["judge engine weights"] = b * judge.params / GIB
    if p.eval_engine:  # allocated when the run starts, held to its end
        resident["eval frozen defender engine weights"] = b * s.params / GIB
        resident["eval frozen defender KV cache"] = EVAL_KV_CACHE_GIB
    if p.eval_embedder:
        resident["eval sentence embedder (fp32)"] = 4 * SENTENCE_EMBEDDER_PARAMS / GIB
    if p.trains:
        resident.update(trainer_weights_gib(p))
        resident[_sharded("AdamW moments (fp32)", p)] = 8 * trainable_params(p) / shards(p) / GIB
    gen = Phase("generation", dict(resident))
    gen.parts["policy KV cache"] = kv_policy
    gen.parts["policy engine workspace"] = engine_workspace_gib(s, b)
    jud = Phase("judging", dict(resident))
    if not shared_engine:
        if p.device != "cuda":
            jud.parts["policy KV cache"] = kv_policy
        jud.parts["judge KV cache"] = kv_judge
        jud.parts["judge engine workspace"] = engine_workspace_gib(judge, b)
    else:
        jud.parts["policy KV cache (judge shares it)"] = max(kv_policy, kv_judge)
    phases = [gen, jud]
    if p.trains:
        tr = Phase("training", dict(resident))
        if p.device != "cuda":  # no sleep mode on CPU: the KV caches stay allocated
            if shared_engine:
                tr.parts["policy KV cache (judge shares it)"] = max(kv_policy, kv_judge)
            else:
                tr.parts["policy KV cache"] = kv_policy
                tr.parts["judge KV cache"] = kv_judge
        tr.parts[_sharded("gradients (fp32)", p)] = 4 * trainable_params(p) / shards(p) / GIB
        if shards(p) > 1:
            tr.parts["FSDP2 gathered root + 2 layers, and gradients (fp32)"] = fsdp2_gathered_gib(p)
        if not (p.lora_rank and p.lora_base_in_compute_dtype):  # frozen fp32 weights are cast every forward
            tr.parts["autocast weight copies"] = b * s.linear_params / GIB
        tr.parts["activations (one micro-batch" + (", checkpointed)" if p.gradient_checkpointing else ")")] = \
            activations_gib(p)
        tr.parts["log-prob kernel buffers"] = logprob_buffers_gib(p)
        phases.append(tr)
    return phases


def advice(p: PlanInput, phases: list[Phase]) -> list[str]:
    """What to change when the plan does not fit: the largest movable parts first."""
    worst = max(phases, key=lambda ph: ph.total)
    if worst.total <= p.budget_gib:
        return []
    over = worst.total - p.budget_gib
    tips = [f"{worst.name} needs {worst.total:.1f} GiB, {over:.1f} GiB over the {p.budget_gib:.0f} GiB budget:"]
    parts = worst.parts
    if not p.lora_rank and p.trains:
        lp = PlanInput(**{**p.__dict__, "lora_rank": 16})
        saved = max(ph.total for ph in phases) - max(ph.total for ph in plan(lp))
        tips.append(f"- LoRA (--lora-rank 16) instead of full fine-tuning saves about {saved:.1f} GiB (no fp32 "
                    f"master, gradients, moments or reference copy of the model)")
    act = next((v for k, v in parts.items() if k.startswith("activations")), 0.0)
    if act > 1 and not p.gradient_checkpointing:
        gp = PlanInput(**{**p.__dict__, "gradient_checkpointing": True})
        tips.append(f"- --gradient-checkpointing cuts activations from {act:.1f} to {activations_gib(gp):.1f} GiB")
    if act > 1:
        tips.append(f"- a smaller --optim.micro-batch-tokens (now {p.micro_batch_tokens}) shrinks activations in "
                    f"proportion")
    kv = sum(v for k, v in parts.items() if "KV" in k)
    if kv > 1:
        tips.append(f"- fewer games per step or shorter max_new_tokens shrink the KV caches ({kv:.1f} GiB now)")
    if "judge engine weights" in parts:
        tips.append(f"- a smaller judge, or the policy's base model as judge, drops "
                    f"{parts['judge engine weights']:.1f} GiB of judge weights")
    if p.ranks > 1 and shards(p) == 1 and p.trains and not p.lora_rank:
        sp = PlanInput(**{**p.__dict__, "shard": "fsdp2"})
        tips.append(f"- --shard fsdp2 splits the trainer's weights, gradients, moments and reference over the "
                    f"{p.ranks} ranks: peak {max(ph.total for ph in plan(sp)):.1f} GiB a rank")
    if p.ranks > 1:
        tips.append("- more ranks do not lower the rest: each rank holds its own engines, judge, KV caches and "
                    "activations; give each rank a device that holds them (judging on fewer ranks is not built)")
    return tips


def ranks_line(p: PlanInput, peak: float) -> list[str]:
    if p.ranks == 1:
        return []
    model = "model" if shards(p) == 1 else f"1/{p.ranks} of the trained model's state (FSDP2)"
    return [f"  per rank: each of {p.ranks} ranks holds all of this (its own engines, judge and {model}, "
            f"{max(1, p.games_per_step // p.ranks)} of the {p.games_per_step} games) on its own device; on CPU, "
            f"ranks on one machine share its RAM ({p.ranks} x {peak:.2f} GiB if all are local)"]


def render(p: PlanInput, phases: list[Phase], detail: bool = True) -> str:
    """The plan as text: every part of every phase (detail), or two lines (what `fast-srt train` prints)."""
    if not detail:
        peak = max(ph.total for ph in phases)
        fits = "fits" if peak <= p.budget_gib else "DOES NOT FIT"
        return "\n".join([f"memory plan ({p.device}, `fast-srt plan` for the parts): "
                          + " | ".join(f"{ph.name} {ph.total:.2f} GiB" for ph in phases),
                          f"  peak {peak:.2f} GiB of {p.budget_gib:.0f} GiB: {fits}"] + ranks_line(p, peak)
                         + ["  " + t for t in advice(p, phases)])
    head = (f"memory plan: policy {p.policy.name} ({p.policy.params / 1e9:.2f}B params), judge "
            f"{(p.judge or p.policy).name}, {'LoRA rank ' + str(p.lora_rank) if p.lora_rank else 'full fine-tuning'}"
            f"{f' x {p.adapters} adapters (one per role)' if p.lora_rank and p.adapters > 1 else ''}"
            f", {p.games_per_step} games x ({p.prompt_tokens} prompt + {p.max_new_tokens} new) tokens, micro-batch "
            f"{p.micro_batch_tokens} tokens, {p.device}, budget {p.budget_gib:.0f} GiB")
    lines = [head]
    for ph in phases:
        fits = "fits" if ph.total <= p.budget_gib else "DOES NOT FIT"
        lines.append(f"  {ph.name:<11} {ph.total:8.2f} GiB  {fits}")
        for k, v in sorted(ph.parts.items(), key=lambda kv: -kv[1]):
            lines.append(f"      {v:8.2f}  {k}")
    peak = max(ph.total for ph in phases)
    verdict = "FITS" if peak <= p.budget_gib else "DOES NOT FIT"
    lines.append(f"  peak {peak:.2f} GiB of {p.budget_gib:.0f} GiB: {verdict}")
    lines += ranks_line(p, peak)
    lines += ["  " + t for t in advice(p, phases)]
    return "\n".join(lines)


def plan_input_from_config(cfg, *, device: str, budget_gib: float, policy: str | None = None,
                           judge: str | None = None, prompt_tokens: int = 320,
                           judge_prompt_tokens: int = 640, trains: bool = True, ranks: int = 1) -> PlanInput:
    """A PlanInput from a TrainConfig; policy/judge: shapes to use instead of cfg.model's (a resolved directory)."""
    m = cfg.model
    policy_shape = resolve_shape(policy or m.model)
    judge_shape = None
    if m.judge_model == "probe":  # a pooling engine holding the policy's base model (another copy of its weights)
        judge_shape = resolve_shape(judge) if judge else policy_shape
    elif m.judge_model not in ("policy",) and not m.judge_model.startswith("rule:"):
        judge_shape = resolve_shape(judge or m.judge_model.removeprefix("probe:"))
    b = 4 if m.dtype == "float32" else 2
    kv = m.kv_cache_gib
    return PlanInput(policy=policy_shape, judge=judge_shape, lora_rank=cfg.lora_rank, dtype_bytes=b,
                     games_per_step=cfg.sampling.games_per_step, prompt_tokens=prompt_tokens,
                     max_new_tokens=cfg.sampling.max_new_tokens, judge_prompt_tokens=judge_prompt_tokens,
                     micro_batch_tokens=cfg.optim.micro_batch_tokens,
                     gradient_checkpointing=cfg.gradient_checkpointing, kl=cfg.algo.kl_coef > 0,
                     kv_cache_gib=kv, judge_kv_cache_gib=kv if not m.judge_model.startswith("rule:") else 0.0,
                     device=device, budget_gib=budget_gib, trains=trains, lora_in_engine=cfg.lora_in_engine,
                     ranks=ranks, shard=cfg.shard if ranks > 1 else "none",
                     adapters=2 if cfg.roles == "per-role" else 1, engine_adapters=engine_adapters(cfg),
                     eval_engine=eval_defender_placement(cfg) == "own_engine", eval_embedder=bool(cfg.eval_every))


def engine_adapters(cfg) -> int:
    """LoRA adapters the policy engine serves side by side: the policy's (one per role with --roles per-role), and
    with the opponent league its snapshots (league.size per role)."""
    current = 2 if cfg.roles == "per-role" else 1
    return current + (2 * cfg.league.size if cfg.league.every else 0)


def device_budget_gib(device: str) -> float:
    """The whole device: the GPU's memory, or the host's RAM on CPU."""
    import os

    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory / GIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
