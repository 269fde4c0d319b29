"""Format warm-up: a short SFT phase that teaches both roles the `<think>/<answer>` format before RL starts.

Without it the 135M default breaks the format in every game of both roles, so the -1 format term dominates every
reward. `ensure_warmup(base_dir, wcfg, dtype)` trains the base model for `wcfg.steps` AdamW steps on the defender
CoT set (fast_srt/data/sft/cot_sft.jsonl: defender prompt -> thinking + answer) and the attacker CoT set
(attacker_cot_sft.jsonl: the game's attacker prompt -> thinking + revised prompt), through the learner's own path
(load_policy, shared-prefix packing, the log-prob kernel, a token-mean cross-entropy on response tokens), and saves
an ordinary HF checkpoint (config, tokenizer, safetensors in the engine dtype) as `cache_dir()/warmup-<key>`.

The key is a hash of everything the result depends on: the base model's identity (the full-content sha256 of every
weight, config, tokenizer and chat-template file: fast_srt.identity), the rendered and tokenized samples (so the
role instructions, the chat template and the target format are in it), the hyper-parameters (steps, lr, batch size,
seed), the saved dtype and the recipe version. A second call
with the same inputs reuses the entry without training; any change gives a new entry.

The checkpoint is written into `.tmp-warmup-<key>-*` beside its final name and renamed into place only once
complete (its `fast_srt_warmup.json` is the last file written): a crash never leaves a directory that looks done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fast_srt.errors import UserError

RECIPE_VERSION = 1  # bump when the training recipe changes (betas, schedule, clipping, targets, packing)
META_FILE = "fast_srt_warmup.json"
PREFIX = "warmup-"
MICRO_BATCH_TOKENS = 4096  # packed row tokens per forward/backward (a batch of 8 fits in one or two)
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
MIN_LR_RATIO = 0.1
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ALPHA_PER_RANK = 2.0
ADAPTER_FILE = "adapter/warmup_adapter.safetensors"  # a subfolder: engines load every top-level *.safetensors
ADAPTER_DTYPE = torch.bfloat16
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "warmup"  # adapters shipped by key (`--ship`)


# ------------------------------------------------------------------------------------------------ the cache key

def base_identity(base_dir: Path) -> dict:
    """What identifies the base model: the full-content sha256 of each weight, config, tokenizer and chat-template
    file (fast_srt.identity)."""
    from fast_srt.identity import model_identity

    try:
        return model_identity(base_dir)
    except UserError as e:
        raise UserError(f"warm-up: {e}") from None


def load_warmup_data(wcfg) -> tuple[list[dict], list[dict]]:
    """(defender records, attacker records) of the warm-up; bad files raise UserError before any model loads."""
    from fast_srt.learner.sft import load_attacker_sft_records, load_sft_records

    return load_sft_records(wcfg.defender_data), load_attacker_sft_records(wcfg.attacker_data)


def samples_digest(samples: list) -> str:
    """sha256 over the rendered, tokenized samples (role, prompt ids, response ids): what the warm-up trains on,
    so a changed role instruction, chat template, tokenizer or target format gives another key."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.role, s.prompt_ids, s.response_ids]).encode())
    return h.hexdigest()


def warmup_key(base_dir: Path, wcfg, dtype: str, defender: list[dict], attacker: list[dict],
               tokenizer=None) -> str:
    """16 hex digits over the base model's identity, the rendered and tokenized samples, the hyper-parameters and
    the dtype (`tokenizer`: the base model's, loaded here when not given)."""
    identity = base_identity(base_dir)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    return _key(identity, wcfg, dtype, warmup_samples(tokenizer, defender, attacker))


def _key(identity: dict, wcfg, dtype: str, samples: list) -> str:
    hp = {k: v for k, v in dataclasses.asdict(wcfg).items() if k not in ("defender_data", "attacker_data")}
    blob = json.dumps({"recipe": RECIPE_VERSION, "base": identity, "dtype": dtype, "hp": hp,
                       "samples": samples_digest(samples)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def warmup_dir(key: str) -> Path:
    from fast_srt.config import cache_dir

    return cache_dir() / f"{PREFIX}{key}"


def is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ training

def warmup_samples(tokenizer, defender: list[dict], attacker: list[dict]) -> list:
    from fast_srt.learner.sft import build_attacker_sft_samples, build_sft_samples

    return build_sft_samples(defender, tokenizer) + build_attacker_sft_samples(attacker, tokenizer)


def sft_batch_loss(model, batch_samples, logprob_fn, autocast, device, backward: bool = True,
                   scale=lambda loss: loss) -> float:
    """Token-mean NLL of the batch's response tokens (T = 1), accumulated over shared-prefix micro-batches;
    scale(loss).backward() into the model's gradients when asked (scale: fp16's GradScaler). Returns the loss."""
    from fast_srt.learner.batch import pack_shared, split_shared_micro_batches
    from fast_srt.learner.loss import sft_loss
    from fast_srt.learner.policy import token_logprobs

    n_tokens = sum(len(s.response_ids) for s in batch_samples)
    total = 0.0
    for mb in split_shared_micro_batches(batch_samples, MICRO_BATCH_TOKENS):
        packed = pack_shared(mb, device=device)
        with torch.set_grad_enabled(backward), autocast():
            logp, _ = token_logprobs(model, packed, logprob_fn, 1.0)
        loss, _ = sft_loss(logp, packed.loss_mask, num_tokens=n_tokens)
        if backward:
            scale(loss).backward()
        total += float(loss.detach())
    return total


def train_warmup(model, samples, wcfg, device: torch.device, compute_dtype: torch.dtype,
                 progress=lambda msg: None) -> dict:
    """wcfg.steps AdamW steps of wcfg.batch_size samples from a seeded shuffled stream over `samples`; linear LR
    warm-up over 10% of the steps, then cosine to MIN_LR_RATIO x lr; gradients clipped to GRAD_CLIP; a non-finite
    loss or gradient skips its step; `progress` hears a line at every quarter. Returns {"losses": [...], "skipped": n}."""
    from fast_srt.learner.policy import build_optimizer, build_scheduler
    from fast_srt.learner.sft import SFTStream
    from fast_srt.learner.step import pick_logprob_impl

    torch.manual_seed(wcfg.seed)
    stream = SFTStream(samples, seed=wcfg.seed)
    optimizer = build_optimizer(model, wcfg.lr, BETAS, 0.0)
    scheduler = build_scheduler(optimizer, wcfg.steps, wcfg.steps // 10, MIN_LR_RATIO)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    logprob_fn = pick_logprob_impl("auto", device)
    amp = compute_dtype != torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=compute_dtype, enabled=amp)

    model.train()
    losses, skipped = [], 0
    t0 = time.perf_counter()
    for i in range(wcfg.steps):
        if i and i % max(1, wcfg.steps // 4) == 0:
            progress(f"step {i}/{wcfg.steps}, loss {losses[-1]:.3f}, {time.perf_counter() - t0:.0f} s")
        batch = stream.next(wcfg.batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss = sft_batch_loss(model, batch, logprob_fn, autocast, device, scale=scaler.scale)
        scaler.unscale_(optimizer)
        gn = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], GRAD_CLIP)
        if not (math.isfinite(loss) and bool(torch.isfinite(gn))):
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            skipped += 1
        else:
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        losses.append(loss)
    return {"losses": losses, "skipped": skipped}


# ------------------------------------------------------------------------------------------------ saving

def save_warm_checkpoint(model, tokenizer, out: Path, dtype: torch.dtype) -> None:
    """An ordinary HF checkpoint in `dtype` (what the engines load), generating normally elsewhere (use_cache)."""
    model.config.use_cache = True
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def write_meta(out: Path, meta: dict) -> None:
    """The marker written last: a directory without it is not a finished warm-up."""
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def ensure_warmup(base_dir: str | Path, wcfg, dtype: str = "bfloat16", quiet: bool = False) -> Path:
    """The warmed checkpoint for (base model, data, hyper-parameters, dtype): taken from the cache, else built from a
    shipped adapter of the same key (LoRA warm-ups), else trained; cached either way. `wcfg.steps == 0` returns
    `base_dir` unchanged. Prints one line unless quiet (and progress while it trains)."""
    base_dir = Path(base_dir)
    if wcfg.steps < 0:
        raise UserError(f"warmup.steps must be >= 0 (0 turns the warm-up off), got {wcfg.steps}")
    if wcfg.steps == 0:
        return base_dir
    from transformers import AutoTokenizer

    defender, attacker = load_warmup_data(wcfg)
    identity = base_identity(base_dir)  # not a checkpoint directory: refused before its tokenizer loads
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    samples = warmup_samples(tokenizer, defender, attacker)
    key = _key(identity, wcfg, dtype, samples)
    target = warmup_dir(key)
    say = (lambda msg: None) if quiet else (lambda msg: print(f"[fast_srt] warm-up: {msg}", flush=True))
    if is_complete(target):
        meta = json.loads((target / META_FILE).read_text())
        say(f"cached ({meta.get('steps')} steps, final loss {meta.get('final_loss'):.3f}) in {target}")
        return target
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shipped = SHIPPED_DIR / key
    if wcfg.lora_rank and (shipped / ADAPTER_FILE).is_file():
        say(f"building the warmed checkpoint from the shipped adapter {shipped.name} (once)")
        model = _load_base(base_dir, wcfg, device)
        _load_adapter(model, shipped / ADAPTER_FILE)
        meta = {**json.loads((shipped / META_FILE).read_text()), "from_shipped": str(shipped)}
        _save_entry(model, tokenizer, target, getattr(torch, dtype), meta)
        say(f"built from the shipped adapter {shipped.name} ({meta['steps']} steps, final loss "
            f"{meta['final_loss']:.3f}) in {time.perf_counter() - t0:.1f} s; cached in {target}")
        return target
    say(f"training {wcfg.steps} steps (once; no shipped adapter has this key)")
    model = _load_base(base_dir, wcfg, device)
    result = train_warmup(model, samples, wcfg, device, getattr(torch, dtype), progress=say)
    losses, seconds = result["losses"], time.perf_counter() - t0
    tail = losses[-max(1, min(5, len(losses))):]
    meta = {"base": str(base_dir), "key": key, "dtype": dtype, **dataclasses.asdict(wcfg), "recipe": RECIPE_VERSION,
            "first_loss": losses[0], "final_loss": sum(tail) / len(tail), "skipped_steps": result["skipped"],
            "samples": {"defender": len(defender), "attacker": len(attacker)}, "seconds": round(seconds, 1),
            "device": device.type}
    _save_entry(model, tokenizer, target, getattr(torch, dtype), meta)
    say(f"{wcfg.steps} steps of {wcfg.batch_size} SFT samples ({len(defender)} defender, {len(attacker)} attacker "
        f"records){f', LoRA rank {wcfg.lora_rank}' if wcfg.lora_rank else ''}, loss {losses[0]:.3f} -> "
        f"{meta['final_loss']:.3f} (mean of the last {len(tail)}), {seconds:.1f} s on {device.type}; cached in "
        f"{target}")
    return target


def _load_base(base_dir: Path, wcfg, device: torch.device):
    """The base model in fp32 for training, with LoRA adapters on every linear layer when wcfg.lora_rank > 0."""
    from fast_srt.learner.lora import apply_lora
    from fast_srt.learner.policy import VARLEN_SDPA, load_policy

    model = load_policy(str(base_dir), dtype=torch.float32, device=device, attn=VARLEN_SDPA)
    if wcfg.lora_rank:
        apply_lora(model, wcfg.lora_rank, LORA_ALPHA_PER_RANK * wcfg.lora_rank, LORA_TARGETS)
    return model


def _load_adapter(model, path: Path) -> None:
    from safetensors.torch import load_file

    from fast_srt.learner.lora import adapter_state_dict

    tensors = load_file(str(path))
    expected = adapter_state_dict(model)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise UserError(f"warm-up: the shipped adapter {path} does not fit this model's LoRA layers; delete it or "
                        f"rebuild it with `fast-srt sft --ship`")
    model.load_state_dict(tensors, strict=False)


def _round_adapter(model) -> dict[str, torch.Tensor]:
    """The adapter as it is kept (ADAPTER_DTYPE), written back into the model: a shipped copy merges exactly as the
    run that trained it did."""
    from fast_srt.learner.lora import adapter_state_dict

    kept = {k: v.to(ADAPTER_DTYPE) for k, v in adapter_state_dict(model).items()}
    model.load_state_dict(kept, strict=False)
    return kept


def _save_entry(model, tokenizer, target: Path, dtype: torch.dtype, meta: dict) -> None:
    """Merge any adapter (kept beside the checkpoint as ADAPTER_FILE) and write the cache entry atomically: into
    `.tmp-<name>-*`, the marker last, then renamed into place."""
    from safetensors.torch import save_file

    from fast_srt.learner.lora import has_lora, merge_into_base

    adapter = _round_adapter(model) if has_lora(model) else None
    if adapter is not None:
        merge_into_base(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        save_warm_checkpoint(model, tokenizer, tmp, dtype)
        if adapter is not None:
            (tmp / ADAPTER_FILE).parent.mkdir()
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER_FILE))
        write_meta(tmp, meta)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same key first: keep its copy
            if not is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ship_warmup(entry: Path) -> Path:
    """Copy a LoRA warm-up's adapter and meta from its cache entry into SHIPPED_DIR/<key>/ (what `fast-srt sft
    --ship` does): a fresh machine with the same base model and inputs then skips the training."""
    meta = json.loads((entry / META_FILE).read_text())
    if not (entry / ADAPTER_FILE).is_file():
        raise UserError(f"warm-up {entry} has no adapter to ship: only a LoRA warm-up (--warmup.lora-rank N) ships")
    out = SHIPPED_DIR / meta["key"]
    (out / ADAPTER_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(entry / ADAPTER_FILE, out / ADAPTER_FILE)
    keep = {k: v for k, v in meta.items() if k not in ("base", "from_shipped")}
    (out / META_FILE).write_text(json.dumps(keep, indent=2, sort_keys=True) + "\n")
    return out
