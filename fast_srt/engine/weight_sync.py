"""The ONLY module that reaches below vLLM's public API: writing trainer weights into the live engine.

vLLM's CPU backend repacks linear weights at load time, so a plain `model.load_weights(...)` after start-up fails;
the layer-wise in-place reload path of the model runner (`reload_weights(weights_iterator=...)`) takes checkpoint
format tensors, repacks them, and writes them into the engine's existing storage. The prefix cache is reset after
every write (cached KV blocks were computed with the old weights).

Tied embeddings: vLLM keeps its own (repacked) copy of the output head; `lm_head.weight` must always be sent,
otherwise the engine keeps a stale head. `fast_srt.learner.policy.weights_for_engine` adds it.

Tested by tests/test_weight_sync.py: a weight written into the engine changes its next generation.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch


def _model_runner(llm):
    # LLM -> LLMEngine -> in-process executor (exists only with VLLM_ENABLE_V1_MULTIPROCESSING=0) -> worker -> runner
    executor = getattr(llm.llm_engine, "model_executor", None)
    if executor is None:
        raise RuntimeError("vLLM engine runs in another process; set VLLM_ENABLE_V1_MULTIPROCESSING=0 before "
                           "building the engine (fast_srt.engine.Engine does)")
    worker = executor.driver_worker
    worker = getattr(worker, "worker", worker)
    return worker.model_runner


def engine_model(llm) -> torch.nn.Module:
    """vLLM's own nn.Module (for read-only inspection in tests)."""
    return _model_runner(llm).get_model()


def push_weights(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
    """Write `weights` into the live engine in place; return the seconds it took."""
    t0 = time.perf_counter()
    with torch.no_grad():
        _model_runner(llm).reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    llm.reset_prefix_cache()
    return time.perf_counter() - t0
