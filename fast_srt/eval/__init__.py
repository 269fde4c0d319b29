"""`fast-srt eval`: a checkpoint's defender safety and attacker diversity on held-out prompt sets (README
"Evaluation"). Pure parts (statistics, the refusal matcher, prompt sets, reports) import no model code; `runner`
drives the in-process engines, `diversity` loads the sentence embedder."""
