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
from typing import Any

import torch

from fast_srt.errors import UserError

RECIPE_VERSION = 1  # bump when the training recipe changes (betas, schedule, clipping, targets, packing)
META_FILE = "fast_srt_warmup.json"
PREFIX = "warmup-"
MICRO_BATCH_TOKENS = 4096  # packed row tokens per forward/backward (a batch of 8 fits in one or two)
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
MIN_LR_RATIO = 0.1


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


def train_warmup(model, samples, wcfg, device: torch.device, compute_dtype: torch.dtype) -> dict:
    """wcfg.steps AdamW steps of wcfg.batch_size samples from a seeded shuffled stream over `samples`; linear LR
    warm-up over 10% of the steps, then cosine to MIN_LR_RATIO x lr; gradients clipped to GRAD_CLIP; a non-finite
    loss or gradient skips its step. Returns {"losses": [...], "skipped": n}."""
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
    for _ in range(wcfg.steps):
        batch = stream.next(wcfg.batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss = sft_batch_loss(model, batch, logprob_fn, autocast, device, scale=scaler.scale)
        scaler.unscale_(optimizer)
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
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
    """The warmed checkpoint for (base model, data, hyper-parameters, dtype): trained and cached on the first call,
    reused afterwards. `wcfg.steps == 0` returns `base_dir` unchanged. Prints one line unless quiet."""
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
    if is_complete(target):
        if not quiet:
            meta = json.loads((target / META_FILE).read_text())
            print(f"[fast_srt] warm-up: cached ({meta.get('steps')} steps, final loss {meta.get('final_loss'):.3f}) "
                  f"in {target}", flush=True)
        return target
    from fast_srt.learner.policy import VARLEN_SDPA, load_policy

    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = getattr(torch, dtype)
    model = load_policy(str(base_dir), dtype=torch.float32, device=device, attn=VARLEN_SDPA)
    result = train_warmup(model, samples, wcfg, device, compute_dtype)
    losses = result["losses"]
    seconds = time.perf_counter() - t0
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        save_warm_checkpoint(model, tokenizer, tmp, compute_dtype)
        tail = losses[-max(1, min(5, len(losses))):]
        write_meta(tmp, {"base": str(base_dir), "key": key, "dtype": dtype, **dataclasses.asdict(wcfg),
                         "recipe": RECIPE_VERSION, "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
                         "skipped_steps": result["skipped"], "samples": {"defender": len(defender),
                                                                         "attacker": len(attacker)},
                         "seconds": round(seconds, 1), "device": device.type})
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same key first: keep its copy
            if not is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        tail = losses[-max(1, min(5, len(losses))):]
        print(f"[fast_srt] warm-up: {wcfg.steps} steps of {wcfg.batch_size} SFT samples ({len(defender)} defender, "
              f"{len(attacker)} attacker records), loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f} (mean of "
              f"the last {len(tail)}), {seconds:.1f} s on {device.type}; cached in {target}", flush=True)
    return target
