"""Checkpoints: an HF-format safetensors directory (transformers and vLLM load it as a model) plus trainer state.

Layout under a run directory:

    run_dir/checkpoints/step_00000100/   config.json, model.safetensors, generation_config.json, tokenizer files,
                                         trainer_state.pt (optimizer, scheduler, RNG, step, extra),
                                         fast_srt_config.json (the run config), COMPLETE (written last)
    run_dir/checkpoints/latest           "step_00000100": the newest complete checkpoint, replaced atomically

With LoRA, model.safetensors is the merged model and lora_adapter.safetensors the adapter (what a resume loads);
with per-role adapters (--roles per-role), model.safetensors is the defender's merged model and
role_adapters/{attacker,defender}.safetensors are the two adapters.

A save is atomic: everything is written into `.tmp-step_...` beside the final directory, fsynced, then renamed
into place; the `latest` pointer is replaced after that, and only then are checkpoints beyond `keep_last`
deleted. A crash at any point leaves the previous checkpoint intact. Loading takes the newest step directory
that is complete and readable, warning about any that are not (a `.tmp-` directory, a missing COMPLETE marker,
an unreadable trainer_state.pt).

trainer_state.pt is read with `torch.load(weights_only=True)`: `extra_state` may hold dicts, lists, str, int,
float, bool, None and tensors only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from fast_srt import faults
from fast_srt.errors import UserError

CKPT_SUBDIR = "checkpoints"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.pt"
RUN_CONFIG_FILE = "fast_srt_config.json"
LATEST = "latest"
LORA_ADAPTER_FILE = "lora_adapter.safetensors"
# per-role adapters (--roles per-role): role_adapters/attacker.safetensors and role_adapters/defender.safetensors,
# each in LORA_ADAPTER_FILE's names; a sub-directory, so that `*.safetensors` in the checkpoint is the model alone
ROLE_ADAPTER_DIR = "role_adapters"
FORMAT_VERSION = 1
# config.json fields that must agree for a checkpoint to be "the same model" as the one being trained
IDENTITY_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "intermediate_size", "tie_word_embeddings")


# ---------------------------------------------------------------------------------------------------- RNG state

def model_only_view(ckpt_dir: str | Path, dest: str | Path) -> Path:
    """`dest`, replaced: links to a checkpoint's model files alone (config, tokenizer, model weights), leaving out
    its adapters, trainer state and markers, so that an engine loading every *.safetensors of a directory loads the
    model only (the merged model: for per-role adapters, the defender's). Returns dest."""
    import shutil

    ckpt_dir, dest = Path(ckpt_dir).resolve(), Path(dest)
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in ckpt_dir.iterdir():
        if f.is_file() and f.name not in {LORA_ADAPTER_FILE, STATE_FILE, COMPLETE, RUN_CONFIG_FILE}:
            (dest / f.name).symlink_to(f)
    return dest


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- saving

def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _save_model(model, out: Path, state_dict: dict | None = None) -> None:
    # The training copy runs with use_cache=False; the saved config should generate normally elsewhere.
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = True
    try:
        from fast_srt.learner.lora import adapter_state_dict, has_lora, lora_roles, merged_state_dict

        if has_lora(model):  # the merged model loads anywhere; the adapter alone resumes training
            from safetensors.torch import save_file

            roles = lora_roles(model)
            # per-role adapters: the defender's merged (the model that answers), each role's adapter as a file
            model.save_pretrained(out, state_dict=merged_state_dict(model, "defender" if roles else None))
            if roles:
                (out / ROLE_ADAPTER_DIR).mkdir()
                for role in roles:
                    save_file(adapter_state_dict(model, role), str(out / ROLE_ADAPTER_DIR / f"{role}.safetensors"))
            else:
                save_file(adapter_state_dict(model), str(out / LORA_ADAPTER_FILE))
        elif state_dict is not None:  # gathered from a sharded model (fast_srt.learner.sharding.full_state)
            model.save_pretrained(out, state_dict=state_dict)
        else:
            model.save_pretrained(out)
    finally:
        model.config.use_cache = use_cache


def _write_checkpoint_files(tmp: Path, step, model, tokenizer, optimizer, scheduler, extra_state, config,
                            full_state: tuple[dict, dict] | None = None) -> None:
    _save_model(model, tmp, full_state[0] if full_state else None)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    faults.hit("checkpoint_partial")
    faults.disk_full_check(step)
    state = {"format": FORMAT_VERSION, "step": int(step),
             "optimizer": full_state[1] if full_state else optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": rng_state(), "extra": extra_state}
    torch.save(state, tmp / STATE_FILE)
    (tmp / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    (tmp / COMPLETE).write_text(f"{step}\n")
    _fsync_tree(tmp)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def checkpoint_bytes(model) -> int:
    """Upper estimate of one checkpoint's size: fp32 weights (merged, with LoRA: plus the adapters), AdamW's two
    fp32 states per trained parameter, and 64 MiB for the tokenizer and small files."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * total + 2 * 4 * trained + 4 * trained * (trained != total) + (64 << 20)


def check_free_space(run_dir: str | Path, need: int) -> None:
    """UserError before the first step when the run directory's disk cannot hold one more checkpoint (a save writes
    the new checkpoint in full before an old one is deleted)."""
    where = Path(run_dir).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"run directory {run_dir}: a checkpoint needs about {_gib(need)} GiB and its disk has "
                        f"{_gib(free)} GiB free; free space or pass a --run-dir on another disk")


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, optimizer, scheduler, extra_state: dict,
                    config: dict, keep_last: int = 2, full_state: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep_last`. Returns its path.
    full_state: (model, optimizer) state dicts to write instead of the model's and optimizer's own (a sharded
    model's, gathered: fast_srt.learner.sharding.full_state); the same files either way."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / CKPT_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by an interrupted save (one trainer process per run dir)
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    final = root / _step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        _write_checkpoint_files(tmp, step, model, tokenizer, optimizer, scheduler, extra_state, config, full_state)
    except OSError as e:  # disk full, quota, permissions: one clear line, the previous checkpoint untouched
        shutil.rmtree(tmp, ignore_errors=True)
        prev = find_latest(run_dir)
        raise UserError(f"writing checkpoint step {step} to {root} failed ({e.strerror or e}); "
                        f"{f'the previous checkpoint {prev.name} is intact' if prev else 'no earlier checkpoint'}"
                        f"; free space (a checkpoint needs about {_gib(_tree_bytes(prev)) if prev else '?'} GiB) "
                        f"and run again with --resume") from None

    if final.exists():  # re-saving a step (after a resume): swap, never leave a gap without the step
        old = root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, final.name + "\n")

    for old_dir in _step_dirs(root)[keep_last:]:
        if old_dir != final:
            shutil.rmtree(old_dir, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------- loading

def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(STEP_PREFIX):
        return None
    try:
        return int(name[len(STEP_PREFIX):])
    except ValueError:
        return None


def _step_dirs(root: Path) -> list[Path]:
    """Step directories under root, newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(dirs, key=_step_of, reverse=True)


def _incomplete_reason(ckpt: Path) -> str | None:
    for name in (COMPLETE, STATE_FILE, "config.json"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    if not any(ckpt.glob("*.safetensors")):
        return "no *.safetensors weights"
    return None


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _complete_checkpoints(run_dir: Path):
    """Complete checkpoint directories, newest first, warning about partial and incomplete ones on the way."""
    if (run_dir / STATE_FILE).is_file():  # run_dir is itself a checkpoint directory
        if _incomplete_reason(run_dir) is None:
            yield run_dir
        return
    root = run_dir / CKPT_SUBDIR
    for partial in sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []:
        if partial.is_dir():
            _warn(f"ignoring partial checkpoint {partial} (an interrupted save)")
    for ckpt in _step_dirs(root):
        reason = _incomplete_reason(ckpt)
        if reason is None:
            yield ckpt
        else:
            _warn(f"ignoring incomplete checkpoint {ckpt}: {reason}; trying the previous one")


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run (or run_dir itself if it is one), else None."""
    return next(_complete_checkpoints(Path(run_dir)), None)


def load_checkpoint(run_dir: str | Path, model=None) -> tuple[Path, dict]:
    """(checkpoint dir, trainer state) of the newest complete, readable checkpoint under run_dir.

    Load the weights from the returned directory (load_policy(ckpt_dir, ...)), then restore_trainer_state().
    With `model`, first checks that the checkpoint is of the same architecture and shapes (UserError if not).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"resume directory {run_dir} does not exist")
    for ckpt in _complete_checkpoints(run_dir):
        try:
            state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupted file
            _warn(f"ignoring corrupted checkpoint {ckpt}: cannot read {STATE_FILE} ({type(e).__name__}: {e})")
            continue
        if model is not None:
            check_same_model(ckpt, model)
        return ckpt, state
    raise UserError(
        f"resume directory {run_dir} has no complete checkpoint (looked for {run_dir / CKPT_SUBDIR}/"
        f"{STEP_PREFIX}*/ with {COMPLETE}); start a new run without --resume or pass the right directory"
    )


def check_same_model(ckpt_dir: str | Path, model) -> None:
    """UserError naming both sides when the checkpoint's config.json describes a different model."""
    saved = json.loads((Path(ckpt_dir) / "config.json").read_text())
    current = model.config.to_dict()
    current["architectures"] = current.get("architectures") or [type(model).__name__]  # None until first saved
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs current model {current.get(k)!r}"
             for k in IDENTITY_FIELDS if k in saved and k in current and saved.get(k) != current.get(k)]
    if diffs:
        raise UserError(f"checkpoint {ckpt_dir} is from a different model ({'; '.join(diffs)}); resume with the "
                        f"model it was trained from, or start a new run directory")


def restore_trainer_state(state: dict, optimizer=None, scheduler=None) -> dict:
    """Load optimizer, scheduler and RNG states from a trainer state; returns state['extra']."""
    if state.get("format") != FORMAT_VERSION:
        raise UserError(f"trainer state format {state.get('format')!r} is not {FORMAT_VERSION}; "
                        f"this checkpoint was written by another fast_srt version")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["extra"]
