"""Training samples and how they become tensors: packed (no padding) for training, padded for tests only.

Alignment convention (used by policy.py, loss.py and every caller):

    A sample is the token sequence x = prompt_ids + response_ids, length L = P + R, packed at offset o.
    Position t (0 <= t < L) of the sample carries the prediction of the NEXT token:
        targets[o + t]   = x[t + 1]                       (0 at t = L - 1, which predicts nothing)
        loss_mask[o + t] = t + 1 >= P and t + 1 < L         (the next token is a response token)
    so loss_mask is True on positions P-1 .. L-2, exactly R positions per sample, and
        logp[o + t] = log pi(x[t + 1] | x[:t + 1])         (token_logprobs in policy.py returns this)
        vllm_logp[o + P - 1 + j] = vllm_logprobs[j]         (the sampler's log-prob of response token j)
    Nothing is ever shifted after packing: hidden state t, target t, mask t and vLLM log-prob t line up.

`loss_index` holds the flat positions where loss_mask is True (built on the host at pack time), so gathering
loss positions on the GPU never needs a data-dependent `nonzero` (a CPU-GPU sync point).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fast_srt.game.rules import ROLES, Role

ROLE_IDS: dict[str, int] = {r: i for i, r in enumerate(ROLES)}  # attacker 0, defender 1


@dataclass
class Sample:
    """One trained sequence: a prompt, the policy's response, its role and its scalar reward."""

    prompt_ids: list[int]
    response_ids: list[int]
    role: Role
    reward: float = 0.0
    vllm_logprobs: list[float] | None = None  # sampler's log-prob of each response token; None for SFT data
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.role not in ROLE_IDS:
            raise ValueError(f"Sample.role must be one of {sorted(ROLE_IDS)}, got {self.role!r}")
        if len(self.prompt_ids) == 0 or len(self.response_ids) == 0:
            raise ValueError(
                f"Sample needs a non-empty prompt and response, got {len(self.prompt_ids)} prompt and "
                f"{len(self.response_ids)} response tokens"
            )
        if self.vllm_logprobs is not None and len(self.vllm_logprobs) != len(self.response_ids):
            raise ValueError(
                f"Sample.vllm_logprobs has {len(self.vllm_logprobs)} entries for {len(self.response_ids)} "
                f"response tokens: one per response token is needed"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class PackedBatch:
    """S samples concatenated into one row of T tokens. See the module docstring for the alignment."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64, restarts at 0 for each sample
    cu_seqlens: torch.Tensor  # [S+1] int32, sample s occupies [cu_seqlens[s], cu_seqlens[s+1])
    targets: torch.Tensor  # [T] int64, next token (0 where loss_mask is False at a sample's last position)
    loss_mask: torch.Tensor  # [T] bool, True where targets[t] is a response token
    loss_index: torch.Tensor  # [N] int64, flat positions where loss_mask is True (N = total response tokens)
    sample_idx: torch.Tensor  # [T] int64, which sample each token belongs to
    roles: torch.Tensor  # [S] int64, ROLE_IDS
    rewards: torch.Tensor  # [S] float32
    vllm_logp: torch.Tensor | None  # [T] float32, sampler log-prob at loss positions, 0 elsewhere
    seqlens: tuple[int, ...]  # host copy of the S sample lengths (no device sync to read them)
    max_seqlen: int  # host int, longest sample (flash-attn varlen wants it as an int)
    response_spans: tuple[tuple[int, int], ...]  # host (start, end) of each sample's loss positions

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_samples(self) -> int:
        return len(self.seqlens)

    @property
    def num_loss_tokens(self) -> int:
        return self.loss_index.shape[0]

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return PackedBatch(**moved)

    def scatter_responses(self, values: list[list[float]] | list[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """Per-sample per-response-token values (R_s each) -> a [T] float32 tensor on the loss positions."""
        if len(values) != self.num_samples:
            raise ValueError(f"scatter_responses: {len(values)} value lists for {self.num_samples} samples")
        out = torch.full((self.num_tokens,), fill, dtype=torch.float32)  # [T] f32
        for (start, end), v in zip(self.response_spans, values):
            v = torch.as_tensor(v, dtype=torch.float32)
            if v.shape[0] != end - start:
                raise ValueError(f"scatter_responses: {v.shape[0]} values for {end - start} response tokens")
            out[start:end] = v
        return out.to(self.input_ids.device)

    def split_responses(self, x: torch.Tensor) -> list[torch.Tensor]:
        """A [T] tensor -> one [R_s] view per sample (its loss positions), the inverse of scatter_responses."""
        return [x[start:end] for start, end in self.response_spans]


def pack(samples: list[Sample], device: torch.device | str | None = None) -> PackedBatch:
    """Concatenate samples into one PackedBatch (built on the host, then moved once)."""
    if not samples:
        raise ValueError("pack: no samples")
    have_vllm = [s.vllm_logprobs is not None for s in samples]
    if any(have_vllm) and not all(have_vllm):
        raise ValueError("pack: some samples have vllm_logprobs and some don't; pack RL and SFT samples apart")
    input_ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    sample_idx: list[int] = []
    mask: list[bool] = []
    vllm: list[float] = []
    cu = [0]
    spans = []
    for i, s in enumerate(samples):
        x = list(s.prompt_ids) + list(s.response_ids)
        n, p = len(x), len(s.prompt_ids)
        o = cu[-1]
        input_ids += x
        targets += x[1:] + [0]
        positions += range(n)
        sample_idx += [i] * n
        mask += [False] * (p - 1) + [True] * (n - p) + [False]
        if s.vllm_logprobs is not None:
            vllm += [0.0] * (p - 1) + [float(v) for v in s.vllm_logprobs] + [0.0]
        spans.append((o + p - 1, o + n - 1))
        cu.append(o + n)
    loss_mask = torch.tensor(mask, dtype=torch.bool)  # [T]
    seqlens = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
    batch = PackedBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),  # [T]
        position_ids=torch.tensor(positions, dtype=torch.int64),  # [T]
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),  # [S+1]
        targets=torch.tensor(targets, dtype=torch.int64),  # [T]
        loss_mask=loss_mask,
        loss_index=loss_mask.nonzero().squeeze(1),  # [N] int64, host-side nonzero: no device sync
        sample_idx=torch.tensor(sample_idx, dtype=torch.int64),  # [T]
        roles=torch.tensor([ROLE_IDS[s.role] for s in samples], dtype=torch.int64),  # [S]
        rewards=torch.tensor([float(s.reward) for s in samples], dtype=torch.float32),  # [S]
        vllm_logp=torch.tensor(vllm, dtype=torch.float32) if all(have_vllm) else None,  # [T]
        seqlens=seqlens,
        max_seqlen=max(seqlens),
        response_spans=tuple(spans),
    )
    return batch if device is None else batch.to(device)


def plan_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sample indices so each group's total length is <= max_tokens (first-fit decreasing, no padding).

    A sample longer than max_tokens gets a group of its own. Indices inside a group keep their original order.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for g, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                groups[g].append(i)
                loads[g] += lengths[i]
                break
        else:
            groups.append([i])
            loads.append(lengths[i])
    return [sorted(g) for g in groups]


def split_micro_batches(samples: list[Sample], max_tokens: int) -> list[list[Sample]]:
    """Token-budget micro-batches: each holds at most max_tokens tokens (unless one sample alone is longer)."""
    plan = plan_micro_batches([s.num_tokens for s in samples], max_tokens)
    return [[samples[i] for i in g] for g in plan]


@dataclass
class PaddedBatch:
    """Right-padded [S, L] tensors with the same alignment as PackedBatch. For the equivalence test only."""

    input_ids: torch.Tensor  # [S, L] int64, pad = 0
    attention_mask: torch.Tensor  # [S, L] int64, 1 on real tokens
    position_ids: torch.Tensor  # [S, L] int64
    targets: torch.Tensor  # [S, L] int64
    loss_mask: torch.Tensor  # [S, L] bool


def pad(samples: list[Sample], pad_id: int = 0) -> PaddedBatch:
    S, L = len(samples), max(s.num_tokens for s in samples)
    input_ids = torch.full((S, L), pad_id, dtype=torch.int64)  # [S, L]
    attention_mask = torch.zeros((S, L), dtype=torch.int64)  # [S, L]
    targets = torch.zeros((S, L), dtype=torch.int64)  # [S, L]
    loss_mask = torch.zeros((S, L), dtype=torch.bool)  # [S, L]
    for i, s in enumerate(samples):
        x = torch.tensor(list(s.prompt_ids) + list(s.response_ids))
        n, p = x.shape[0], len(s.prompt_ids)
        input_ids[i, :n] = x
        attention_mask[i, :n] = 1
        targets[i, : n - 1] = x[1:]
        loss_mask[i, p - 1 : n - 1] = True
    position_ids = torch.arange(L).expand(S, L).clone()  # [S, L]
    return PaddedBatch(input_ids, attention_mask, position_ids, targets, loss_mask)
