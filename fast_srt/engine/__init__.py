"""The in-process vLLM engines: the engine wrapper (engine), the one module below vLLM's public API (weight_sync),
the judge on an engine (judge), a batch of games (rollout), where the engines go (placement). The only layer that
imports vLLM."""
