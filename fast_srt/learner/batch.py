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

import itertools
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
    layout: PrefixLayout | None = None  # shared-prefix pieces (pack_shared); None: each sample whole (pack)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_samples(self) -> int:
        return len(self.response_spans)

    @property
    def num_loss_tokens(self) -> int:
        return self.loss_index.shape[0]

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, PrefixLayout)) else v)
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
    return _pack_pieces(samples, [(i, 0, s.num_tokens, -1) for i, s in enumerate(samples)], device, "pack")


def _pack_pieces(samples: list[Sample], pieces: list[tuple[int, int, int, int]], device, name: str,
                 shared: bool = False) -> PackedBatch:
    """The row of `pieces` (owner sample, start, end, parent piece), in order; each sample whole when not shared.
    A piece that ends at its sample's end is the sample's leaf (its loss positions are there)."""
    if not samples:
        raise ValueError(f"{name}: no samples")
    have_vllm = [s.vllm_logprobs is not None for s in samples]
    if any(have_vllm) and not all(have_vllm):
        raise ValueError(f"{name}: some samples have vllm_logprobs and some don't; pack RL and SFT samples apart")
    full = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    input_ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    sample_idx: list[int] = []
    mask: list[bool] = []
    vllm: list[float] = []
    starts, lengths, context, parents, ctx_index = [], [], [], [], []
    spans: list[tuple[int, int] | None] = [None] * len(samples)
    for owner, a, b, parent in pieces:
        x, o = full[owner], len(input_ids)
        leaf = b == len(x)
        p = len(samples[owner].prompt_ids)
        input_ids += x[a:b]
        targets += x[a + 1:b + 1] + ([0] if leaf else [])
        positions += range(a, b)
        sample_idx += [owner if leaf else -1] * (b - a)
        if leaf:
            # sample position t is a loss position when p - 1 <= t <= len(x) - 2 (module docstring)
            mask += [p - 1 <= t < len(x) - 1 for t in range(a, b)]
            if all(have_vllm):
                vllm += [0.0] * (p - 1 - a) + [float(v) for v in samples[owner].vllm_logprobs] + [0.0]
            spans[owner] = (o + p - 1 - a, o + len(x) - 1 - a)
        else:
            mask += [False] * (b - a)
            vllm += [0.0] * (b - a) if all(have_vllm) else []
        if shared:
            chain, q = [], parent
            while q >= 0:
                chain.append(q)
                q = parents[q]
            for q in reversed(chain):
                ctx_index += range(starts[q], starts[q] + lengths[q])
            ctx_index += range(o, o + b - a)
        starts.append(o)
        lengths.append(b - a)
        context.append(a)
        parents.append(parent)
    cu_q = [0, *itertools.accumulate(lengths)]
    layout = None
    if shared:
        cu_k = [0, *itertools.accumulate(c + n for c, n in zip(context, lengths))]
        layout = PrefixLayout(
            starts=tuple(starts), lengths=tuple(lengths), context=tuple(context), parents=tuple(parents),
            ctx_index=torch.tensor(ctx_index, dtype=torch.int64),  # [sum(context + lengths)]
            cu_q=torch.tensor(cu_q, dtype=torch.int32), cu_k=torch.tensor(cu_k, dtype=torch.int32),  # [pieces + 1]
            max_q=max(lengths), max_k=max(c + n for c, n in zip(context, lengths)))
    loss_mask = torch.tensor(mask, dtype=torch.bool)  # [T]
    batch = PackedBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),  # [T]
        position_ids=torch.tensor(positions, dtype=torch.int64),  # [T]
        cu_seqlens=torch.tensor(cu_q, dtype=torch.int32),  # [pieces + 1] (pack: [S + 1])
        targets=torch.tensor(targets, dtype=torch.int64),  # [T]
        loss_mask=loss_mask,
        loss_index=loss_mask.nonzero().squeeze(1),  # [N] int64, host-side nonzero: no device sync
        sample_idx=torch.tensor(sample_idx, dtype=torch.int64),  # [T]
        roles=torch.tensor([ROLE_IDS[s.role] for s in samples], dtype=torch.int64),  # [S]
        rewards=torch.tensor([float(s.reward) for s in samples], dtype=torch.float32),  # [S]
        vllm_logp=torch.tensor(vllm, dtype=torch.float32) if all(have_vllm) else None,  # [T]
        seqlens=tuple(lengths),
        max_seqlen=max(lengths),
        response_spans=tuple(spans),
        layout=layout,
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


# --------------------------------------------------------------------------------------------------------------
# Shared-prefix packing: every token of a shared prompt prefix is computed once per micro-batch.
#
# In the self-play game every attacker prompt starts with the same instruction (and harmful seeds share a longer
# one), every defender prompt with another; GRPO groups share their whole prompt. `pack_shared` lays the samples of
# a micro-batch out as a prefix tree (a radix tree over prompt tokens): each shared run of prompt tokens is one
# *piece* of the packed row, and each sample ends in a leaf piece holding the rest of its tokens. A piece attends
# to its ancestors' pieces (root first) and causally to itself; its positions continue from its ancestors' length.
# The whole micro-batch is one autograd graph, so the gradient through a shared piece is the sum over all samples
# below it: the same loss and gradients as packing every sample whole, up to float summation order
# (tests/learner/test_prefix_sharing.py compares both in fp32).
#
# A leaf always starts at or before its sample's last prompt token (position P - 1 carries the prediction of the
# first response token), so every loss position is in a leaf and belongs to exactly one sample.

MIN_SHARED_TOKENS = 16  # shorter common runs are not worth a piece (one more attention call per layer)


@dataclass
class PrefixLayout:
    """The pieces of a shared-prefix row, in row order (a parent before its children).

    Piece i occupies row positions [starts[i], starts[i] + lengths[i]) and attends to `context[i]` ancestor tokens
    (their row positions come first in its slice of ctx_index) and then causally to itself."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    context: tuple[int, ...]  # ancestor tokens of each piece
    parents: tuple[int, ...]  # parent piece index, -1 for a root
    ctx_index: torch.Tensor  # [sum(context[i] + lengths[i])] int64: row positions of each piece's keys, in order
    cu_q: torch.Tensor  # [pieces + 1] int32: piece boundaries in the row (queries)
    cu_k: torch.Tensor  # [pieces + 1] int32: piece boundaries in ctx_index (keys and values)
    max_q: int
    max_k: int
    _masks: dict = field(default_factory=dict, repr=False)  # (n, context, dtype, device) -> mask

    @property
    def key_lengths(self) -> tuple[int, ...]:
        return tuple(c + n for c, n in zip(self.context, self.lengths))

    @property
    def shares(self) -> bool:
        return any(c > 0 for c in self.context)

    def mask(self, n: int, context: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[n, context + n] additive attention mask (0 or -inf) of a piece of n queries after `context` ancestor
        tokens: query j sees keys 0 .. context + j. Built once per shape, dtype and device, reused by every layer
        and the backward."""
        key = (n, context, dtype, device)
        m = self._masks.get(key)
        if m is None:
            keep = torch.ones(n, context + n, dtype=torch.bool, device=device).tril(context)
            m = torch.zeros(n, context + n, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
            self._masks[key] = m
        return m

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PrefixLayout:
        moved = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items() if k != "_masks"}
        return PrefixLayout(**moved)


def _common_run(seqs: list[list[int]], depth: int) -> int:
    """Length of the common run of all seqs from `depth` on."""
    n = 0
    first = seqs[0]
    limit = min(len(s) for s in seqs) - depth
    while n < limit and all(s[depth + n] == first[depth + n] for s in seqs):
        n += 1
    return n


def prefix_tree(samples: list[Sample], min_shared: int = MIN_SHARED_TOKENS) -> list[tuple[int, int, int, int]]:
    """The pieces of a radix tree over the samples' prompts, parents first: (owner sample, start, end, parent).

    Tokens [start, end) of sample `owner`'s full sequence (prompt + response) form the piece. A shared piece
    covers prompt tokens only, never a sample's last prompt token; each sample has one leaf piece (end = its
    length). A common run from the start shorter than min_shared is not shared (it goes down into the pieces
    below); below a shared piece every common run is. The row then holds exactly sum(tokens) minus the runs
    each sample shares with the one before it in sorted order (split_shared_micro_batches counts that way)."""
    shareable = [list(s.prompt_ids[:-1]) for s in samples]
    pieces: list[tuple[int, int, int, int]] = []

    def grow(idx: list[int], start: int, depth: int, parent: int) -> None:
        # idx: samples sharing tokens [0, depth); tokens [start, depth) are not in any piece yet
        if len(idx) == 1:
            i = idx[0]
            pieces.append((i, start, samples[i].num_tokens, parent))
            return
        run = _common_run([shareable[i] for i in idx], depth)
        end = depth + run
        if end - start >= min_shared or (parent >= 0 and run > 0):  # below a shared piece any run is shared
            pieces.append((idx[0], start, end, parent))
            parent, start = len(pieces) - 1, end
        children: dict[int, list[int]] = {}
        for i in idx:
            if len(shareable[i]) == end:
                pieces.append((i, start, samples[i].num_tokens, parent))  # nothing left to share: a leaf
            else:
                children.setdefault(shareable[i][end], []).append(i)
        for group in children.values():
            grow(group, start, end, parent)

    grow(list(range(len(samples))), 0, 0, -1)
    return pieces


def pack_shared(samples: list[Sample], device: torch.device | str | None = None,
                min_shared: int = MIN_SHARED_TOKENS) -> PackedBatch:
    """Pack samples with their common prompt prefixes computed once (see above). Same fields as `pack`, with:
    cu_seqlens/seqlens/max_seqlen describe the pieces of the row, `layout` says what each piece attends to, and
    sample_idx is -1 on shared pieces. When nothing is shared, it is `pack` (layout None). loss_mask, loss_index,
    targets, vllm_logp, response_spans, split_responses and scatter_responses mean what they mean for `pack`."""
    if not samples:
        raise ValueError("pack_shared: no samples")
    pieces = prefix_tree(samples, min_shared)
    if len(pieces) == len(samples):  # nothing shared: the plain layout (and its faster attention path)
        return pack(samples, device)
    return _pack_pieces(samples, pieces, device, "pack_shared", shared=True)


def _shared_run(a: list[int], b: list[int], min_shared: int) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n if n >= min_shared else 0


def split_shared_micro_batches(samples: list[Sample], max_tokens: int,
                               min_shared: int = MIN_SHARED_TOKENS) -> list[list[Sample]]:
    """Token-budget micro-batches for pack_shared: samples sorted by prompt so that those sharing a prefix sit
    together, then filled in order, each sample costing its tokens minus the run it shares with the previous one
    (the size of a radix tree over sorted strings). A micro-batch holds about max_tokens row tokens at most
    (unless one sample alone is longer)."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    keys = [list(s.prompt_ids[:-1]) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: keys[i])
    groups: list[list[int]] = []
    load = 0
    for j, i in enumerate(order):
        shared = _shared_run(keys[i], keys[order[j - 1]], min_shared) if j and groups and groups[-1] else 0
        cost = samples[i].num_tokens - shared
        if groups and load + cost <= max_tokens:
            groups[-1].append(i)
            load += cost
        else:
            groups.append([i])
            load = samples[i].num_tokens
    return [[samples[i] for i in g] for g in groups]
