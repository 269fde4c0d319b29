"""LoRA for small device budgets: frozen base weights, trainable low-rank A/B on chosen linear layers.

The model keeps its HF structure (each target `nn.Linear` is replaced by `LoRALinear` holding the original layer as
`base`), so packing, the fused log-prob and checkpointing work unchanged. What changes:
- only A/B train: optimizer states and gradients are rank-sized, not model-sized;
- the KL reference is the same model with the adapters switched off (`adapters_disabled`): no second copy;
- the engine receives merged weights W + (alpha/r) B A (`merged_state_dict`), written in place as usual;
- checkpoints hold the merged model (loadable by transformers and vLLM as is) plus `lora_adapter.safetensors`.

Per-role adapters (`--roles per-role`): each adapted layer holds one A/B pair per role (`lora_A_attacker`,
`lora_B_attacker`, `lora_A_defender`, `lora_B_defender`) over the one frozen base; `active_adapter(model, role)`
chooses the pair a forward uses (the last role, the defender, by default). `adapters_disabled` switches every pair
off. The per-role functions below take `role=`: that role's pair, under the shared names (`lora_A`, `lora_B`), so a
role's adapter file or PEFT directory has a shared run's layout.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


class LoRALinear(nn.Module):
    """roles (): one adapter, `lora_A` / `lora_B`; roles ("attacker", "defender"): one pair per role,
    `lora_A_attacker`, ..., of which `active` is used (the last role unless active_adapter says otherwise)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, roles: tuple[str, ...] = ()):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.roles = tuple(roles)
        for suffix in [f"_{r}" for r in self.roles] or [""]:
            a = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))  # [r, in]
            setattr(self, f"lora_A{suffix}", a)
            setattr(self, f"lora_B{suffix}", nn.Parameter(torch.zeros(base.out_features, rank,
                                                                       dtype=torch.float32)))  # [out, r]: W
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.active = self.roles[-1] if self.roles else None
        self.enabled = True

    def pair(self, role: str | None = None) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) of `role` (default: the active one; a one-adapter layer has only its own)."""
        if not self.roles:
            return self.lora_A, self.lora_B
        role = role or self.active
        if role not in self.roles:
            raise ValueError(f"no adapter for role {role!r} (the layer has {self.roles})")
        return getattr(self, f"lora_A_{role}"), getattr(self, f"lora_B_{role}")

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.pair()
        return y + (x.to(a.dtype) @ a.t() @ b.t()).to(y.dtype) * self.scale

    @torch.no_grad()
    def merged_weight(self, role: str | None = None) -> torch.Tensor:
        """W + (alpha/r) B A, summed in fp32 (the base may be held in the compute dtype), returned in fp32."""
        a, b = self.pair(role)
        return self.base.weight.float() + (b @ a) * self.scale


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], roles: tuple[str, ...] = ()
               ) -> int:
    """Freeze the model and put LoRA on every nn.Linear whose attribute name is in `targets` (one adapter, or one
    per role in `roles`); returns how many layers."""
    model.requires_grad_(False)
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, roles).to(child.weight.device))
                n += 1
    if n == 0:
        raise ValueError(f"no linear layer named any of {targets} in {type(model).__name__}")
    return n


def base_to_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold the frozen base of every adapted linear layer in the compute dtype: under autocast the layer computes
    the same numbers (autocast would cast the fp32 weight to `dtype` on every forward anyway, and keep that copy
    for the backward), in half the memory, and with no per-forward copy."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.base.to(dtype)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_roles(model: nn.Module) -> tuple[str, ...]:
    """The roles of a model with per-role adapters; () with one adapter or none."""
    return next((m.roles for m in model.modules() if isinstance(m, LoRALinear)), ())


@contextmanager
def active_adapter(model: nn.Module, role: str):
    """Inside: every forward of a model with per-role adapters uses `role`'s (ValueError for an unknown role)."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear) and m.roles]
    if mods and role not in mods[0].roles:
        raise ValueError(f"no adapter for role {role!r} (the model has {mods[0].roles})")
    before = [m.active for m in mods]
    for m in mods:
        m.active = role
    try:
        yield model
    finally:
        for m, r in zip(mods, before):
            m.active = r


def role_adapter(model: nn.Module, role: str):
    """active_adapter(model, role) when the model has per-role adapters, else nothing changes."""
    return active_adapter(model, role) if lora_roles(model) else nullcontext(model)


@contextmanager
def adapters_disabled(model: nn.Module):
    """The frozen base model (the KL reference) without a second copy of the weights."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def merged_state_dict(model: nn.Module, role: str | None = None) -> dict[str, torch.Tensor]:
    """HF-named weights with every adapter merged in (what the engine and a saved checkpoint need); per-role
    adapters: `role`'s (default: the active one)."""
    out: dict[str, torch.Tensor] = {}
    lora_prefixes = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            lora_prefixes[name] = m
    for name, t in model.state_dict().items():
        if ".lora_A" in name or ".lora_B" in name:
            continue
        if ".base." in name:
            prefix, leaf = name.rsplit(".base.", 1)
            m = lora_prefixes[prefix]
            out[f"{prefix}.{leaf}"] = m.merged_weight(role) if leaf == "weight" else t
        else:
            out[name] = t
    return out


@torch.no_grad()
def merge_into_base(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every LoRALinear by its base nn.Linear holding W + (alpha/r) B A (summed in fp32, then cast to `dtype`
    or the base's own dtype): an ordinary model again, trainable in full. Returns how many layers were merged."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                w = child.merged_weight()
                child.base.weight.data = w.to(dtype or child.base.weight.dtype)
                setattr(parent, name, child.base.requires_grad_(True))
                n += 1
    return n


def adapter_state_dict(model: nn.Module, role: str | None = None) -> dict[str, torch.Tensor]:
    """Every adapter tensor by its state-dict name; with `role` (per-role adapters), that role's alone, under the
    shared names (`...q_proj.lora_A`)."""
    if role is None:
        return {k: v.detach().contiguous() for k, v in model.state_dict().items()
                if ".lora_A" in k or ".lora_B" in k}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a, b = m.pair(role)
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a.detach().contiguous(), b.detach().contiguous()
    return out


@torch.no_grad()
def load_role_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], role: str) -> None:
    """Copy `tensors` (adapter_state_dict(model, role)'s names and shapes, checked by the caller) into `role`'s
    adapter."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a, b = m.pair(role)
            a.copy_(tensors[f"{name}.lora_A"])
            b.copy_(tensors[f"{name}.lora_B"])


@torch.no_grad()
def adapter_for_engine(model: nn.Module, role: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted layer's (A [r, in], (alpha/r) B [out, r]) by its module name, fp32: what an engine's LoRA slot
    holds (vLLM folds the scale into B when it loads an adapter). Per-role adapters: `role`'s (default: active)."""
    return {name: (m.pair(role)[0].detach(), m.pair(role)[1].detach() * m.scale)
            for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_peft_adapter(model: nn.Module, out_dir, base_model: str = "", role: str | None = None) -> None:
    """The adapters as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors): what vLLM loads for a
    LoRA request, and what `peft.PeftModel.from_pretrained` reads. Per-role adapters: `role`'s (default: active)."""
    mods = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    write_peft_adapter({name: m.pair(role) for name, m in mods.items()}, next(iter(mods.values())).scale, out_dir,
                       base_model)


def write_peft_adapter(pairs: dict, scale: float, out_dir, base_model: str = "") -> None:
    """A PEFT LoRA directory from (A [r, in], B [out, r]) pairs by module name and the scale alpha / r (unscaled
    B, as the trainer holds it): save_peft_adapter's files, from tensors alone (a league snapshot's)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    rank = next(iter(pairs.values()))[0].shape[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scale * rank,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in pairs}), "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": str(base_model)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
