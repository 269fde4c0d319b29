"""LoRA for small device budgets: frozen base weights, trainable low-rank A/B on chosen linear layers.

The model keeps its HF structure (each target `nn.Linear` is replaced by `LoRALinear` holding the original layer as
`base`), so packing, the fused log-prob and checkpointing work unchanged. What changes:
- only A/B train: optimizer states and gradients are rank-sized, not model-sized;
- the KL reference is the same model with the adapters switched off (`adapters_disabled`): no second copy;
- the engine receives merged weights W + (alpha/r) B A (`merged_state_dict`), written in place as usual;
- checkpoints hold the merged model (loadable by transformers and vLLM as is) plus `lora_adapter.safetensors`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))  # [out, r]: starts at W
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (x.to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()).to(y.dtype) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha/r) B A, summed in fp32 (the base may be held in the compute dtype), returned in fp32."""
        return self.base.weight.float() + (self.lora_B @ self.lora_A) * self.scale


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> int:
    """Freeze the model and put LoRA on every nn.Linear whose attribute name is in `targets`; returns how many."""
    model.requires_grad_(False)
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha).to(child.weight.device))
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
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named weights with every adapter merged in (what the engine and a saved checkpoint need)."""
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
            out[f"{prefix}.{leaf}"] = m.merged_weight() if leaf == "weight" else t
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


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}


@torch.no_grad()
def adapter_for_engine(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted layer's (A [r, in], (alpha/r) B [out, r]) by its module name, fp32: what an engine's LoRA slot
    holds (vLLM folds the scale into B when it loads an adapter)."""
    return {name: (m.lora_A.detach(), m.lora_B.detach() * m.scale) for name, m in model.named_modules()
            if isinstance(m, LoRALinear)}


def save_peft_adapter(model: nn.Module, out_dir, base_model: str = "") -> None:
    """The adapters as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors): what vLLM loads for a
    LoRA request, and what `peft.PeftModel.from_pretrained` reads."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    mods = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    first = next(iter(mods.values()))
    rank = first.lora_A.shape[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in mods.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": first.scale * rank,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}), "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": str(base_model)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
