"""fast_srt.kernels: fused log-prob/entropy and advantage kernels (Triton) with torch twins of the same signature.

Installed as `fast_srt.kernels` (never a bare `kernels`, which is a different PyPI package). Pick implementations
once per device with `select_logprobs_impl` / `select_advantages_impl`.
"""

from .advantages import (
    group_advantages,
    group_advantages_ref,
    reinforce_pp_advantages,
    reinforce_pp_advantages_ref,
    select_advantages_impl,
)
from .logprobs import fused_logprobs, logprobs_naive, logprobs_native, logprobs_chunked, select_logprobs_impl

# every log-prob implementation by the name the config, the benches and the tests use
LOGPROB_IMPLS = {"naive": logprobs_naive, "chunked": logprobs_chunked, "native": logprobs_native, "triton": fused_logprobs}

__all__ = [
    "LOGPROB_IMPLS",
    "fused_logprobs",
    "logprobs_chunked",
    "logprobs_naive",
    "logprobs_native",
    "select_logprobs_impl",
    "reinforce_pp_advantages",
    "reinforce_pp_advantages_ref",
    "group_advantages",
    "group_advantages_ref",
    "select_advantages_impl",
]
