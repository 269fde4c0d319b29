"""Shared fixtures: a tiny locally built model directory and one in-process engine per test session."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from fast_srt.run.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from fast_srt.engine.engine import Engine

    return Engine(tiny_model_dir, dtype="float32", max_model_len=512, kv_cache_gib=1, seed=0)


@pytest.fixture(scope="session")
def tiny_bos_engine(tmp_path_factory):
    """An engine on a tiny model whose tokenizer adds a BOS token and whose chat template writes one too (Llama-3
    style). Session-scoped like tiny_engine: an in-process engine torn down mid-session breaks the others."""
    from fast_srt.engine.engine import Engine
    from fast_srt.run.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny_bos") / "llama", arch="llama", bos=True)
    return Engine(model_dir, dtype="float32", max_model_len=256, kv_cache_gib=1, seed=0, name="bos")


@pytest.fixture(scope="session")
def tiny_pooling_engine(tiny_model_dir):
    """A pooling engine (final hidden state of every token) on the tiny model, for the probe judge. Session-scoped
    like the others: tearing an in-process engine down mid-session breaks the rest."""
    from fast_srt.engine.engine import Engine

    return Engine(tiny_model_dir, dtype="float32", max_model_len=512, kv_cache_gib=1, seed=0, name="judge",
                  runner="pooling")


@pytest.fixture(scope="session")
def tiny_lora_engine(tiny_model_dir):
    """A generating engine on the tiny model that serves LoRA adapters (rank up to 8, up to 4 side by side: the
    policy's, and per-role ones). Session-scoped like the others."""
    from fast_srt.engine.engine import Engine

    return Engine(tiny_model_dir, dtype="float32", max_model_len=256, kv_cache_gib=1, seed=0, name="lora",
                  enable_lora=True, max_lora_rank=8, max_loras=4)
