"""A sentence-transformers BERT encoder run packed: a text's vector does not depend on the texts beside it.

sentence-transformers pads a pass's texts to its longest and multiplies all their rows at once. Both move a text's
vector with its pass: attention runs over the padding, and a matrix product's kernel (oneDNN for bfloat16, MKL for
float32) picks its blocking from the number of rows, which changes how a row's sums are rounded (measured on this
project's machine: a row of the 1536-wide bfloat16 product came out one bfloat16 step apart in passes of 9 and 109
rows). In bfloat16 a vector then moved by up to ~2e-3 with its pass, so a prompt near a tie between two tasks could
be routed one way alone and another beside other prompts.

Here every text's tokens are laid end to end in one sequence, with no padding: attention runs per text over its own
tokens (torch's fused attention for CPU), and every product runs on blocks of exactly ROW_BLOCK rows (the pass's
rows padded once with zero rows to a whole number of blocks), so each row always meets the same kernel with the same
blocking. A text's vector is then a function of the text, the weights and the thread count alone: the same bits
alone and in any pass (`tests/test_embedder_packed.py`). No padding also makes a pass cheaper: all-MiniLM-L6-v2,
float32, 1 thread, 8 short prompts in one pass 33.5 ms packed against 38.5 through sentence-transformers, one prompt
9.3 against 11.0 (bfloat16: docs/serving.md). In bfloat16 the fused attention (a text's attention as [1, H, n, d],
torch's flash kernel for CPU; as [H, n, d] it took the math path, a dozen operators of their own) and the GELU
inside its product (oneDNN's post-op, not a pass over the product's output) took a pass of 8 bench prompts from
14.4-16.4 ms to 12.7-14.9, a lone prompt from 4.3-5.1 to 3.8-4.3 (1 thread, the two versions alternating in one
process); its vectors moved by up to 2.2e-3, so the embedder's name carries the revision
(`embedder.PACKED_BFLOAT16_REVISION`).

What runs packed: a `Transformer` module over a transformers `BertModel` (absolute positions, an encoder), then
mean `Pooling`, then optionally `Normalize`; tokenized by the model's own `preprocess`, so its truncation and
special tokens hold. Any other model is encoded by sentence-transformers (`unsupported` says why).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

# TorchScript's Scalar: the union it reads as its `number` type (the type of `_linear_pointwise`'s scalars).
_Number = int | float | complex

# Rows per matrix-product call. Fixed, so that a row's result never depends on how many rows a pass holds; 32 keeps
# a lone ~16-token prompt's padding small while a pass of 8 prompts makes ~4 calls a product. (At 64 rows, oneDNN
# split the 1536-wide bfloat16 product differently at 2 threads than at 1; at 32 it did not.)
ROW_BLOCK = 32


def unsupported(model: Any) -> str | None:
    """Why `model` (a loaded `SentenceTransformer`) cannot run packed, or None when it can."""
    from transformers import BertModel

    modules = list(model)
    names = [type(m).__name__ for m in modules]
    if len(modules) not in (2, 3) or names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]):
        return f"modules {names}, not Transformer, Pooling[, Normalize]"
    encoder = getattr(modules[0], "auto_model", None)
    if not isinstance(encoder, BertModel):
        return f"encoder {type(encoder).__name__}, not BertModel"
    config = encoder.config
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute") or config.is_decoder:
        return "not an encoder with absolute positions"
    if config.hidden_act != "gelu":
        return f"activation {config.hidden_act!r}, not gelu"
    mode = modules[1].pooling_mode
    if (mode if isinstance(mode, str) else tuple(mode)) not in ("mean", ("mean",)):
        return f"pooling {mode!r}, not mean"
    return None


class PackedEncoder:
    """Encodes texts with a supported sentence-transformers model's own weights (`unsupported`), packed.

    The pass after tokenizing runs as one TorchScript call (`_packed_forward`), which holds no GIL while it runs:
    run op by op from Python, each of a pass's ~300 operators gives the GIL up and waits to take it back, and beside
    the server's other Python threads a pass took 45 ms of wall time for 15 of CPU (16 routed clients; beside a
    thread spinning in Python, a pass of 7 prompts took 2157 ms op by op and 117 ms scripted, 15.0 and 12.2 alone).
    Where TorchScript cannot compile it (a torch without it), the same function runs op by op: the same operators,
    the same bits.

    Args:
        model: The loaded `SentenceTransformer`, its weights already in the dtype to run in (float32 or bfloat16).
    """

    def __init__(self, model: Any) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"this model cannot run packed: {reason}")
        self._model = model
        bert = model[0].auto_model
        config = bert.config
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        emb = bert.embeddings
        self.eps = float(emb.LayerNorm.eps)
        # The word, token type and position tables, then the embeddings' LayerNorm weight and bias.
        self._tables = [
            t.detach()
            for t in (
                emb.word_embeddings.weight,
                emb.token_type_embeddings.weight,
                emb.position_embeddings.weight,
                emb.LayerNorm.weight,
                emb.LayerNorm.bias,
            )
        ]
        self._weights: list[Any] = []  # four products a layer: query-key-value, attention out, up, down
        self._biases: list[Any] = []
        self._norms: list[Any] = []  # weight and bias of the two LayerNorms a layer
        with torch.no_grad():
            for layer in bert.encoder.layer:
                own, out = layer.attention.self, layer.attention.output
                products = [
                    (
                        torch.cat([own.query.weight, own.key.weight, own.value.weight]),  # one product, not three
                        torch.cat([own.query.bias, own.key.bias, own.value.bias]),
                    ),
                    (out.dense.weight, out.dense.bias),
                    (layer.intermediate.dense.weight, layer.intermediate.dense.bias),
                    (layer.output.dense.weight, layer.output.dense.bias),
                ]
                for weight, bias in products:
                    self._weights.append(weight.detach().contiguous())
                    self._biases.append(bias.detach().contiguous())
                for norm in (out.LayerNorm, layer.output.LayerNorm):
                    self._norms += [norm.weight.detach(), norm.bias.detach()]
        self._weights, self.prepacked = _prepacked(self._weights)
        self._forward = _scripted()

    def encode(self, texts: list[str]) -> np.ndarray:
        """One row per text, L2-normalised in float32. [n, dim] float32"""
        features = self._model.preprocess(texts)
        mask = features["attention_mask"].bool()
        lengths = mask.sum(dim=1).tolist()
        ids = features["input_ids"][mask]  # [T]: the texts' tokens end to end
        types = features["token_type_ids"][mask] if "token_type_ids" in features else torch.zeros_like(ids)
        positions = torch.cat([torch.arange(n) for n in lengths])
        device = self._tables[0].device
        ids, types, positions = ids.to(device), types.to(device), positions.to(device)
        with torch.inference_mode():
            vectors = self._forward(
                ids,
                types,
                positions,
                lengths,
                self._tables,
                self._weights,
                self._biases,
                self._norms,
                self.heads,
                self.head_dim,
                self.eps,
                self.prepacked,
                ROW_BLOCK,
            )
        return np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)


def _prepacked(weights: list[Any]) -> tuple[list[Any], bool]:
    """bfloat16 weights on a CPU packed once into oneDNN's blocked layout for ROW_BLOCK rows, as inductor's weight
    freezing does: `F.linear` reorders a bfloat16 weight on every call, which was a third of a lone prompt's
    products (all-MiniLM-L6-v2's 24 products of 32 rows, 1 thread: 1.83 ms packed against 2.66, the same bits).
    float32 gains nothing from it (MKL: 6.9 against 7.0 ms) and keeps its weights. Returns (weights, packed)."""
    first = weights[0]
    if first.dtype != torch.bfloat16 or first.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return weights, False
    try:
        return [torch.ops.mkldnn._reorder_linear_weight(w, ROW_BLOCK) for w in weights], True
    except (RuntimeError, AttributeError):  # a build without the op: plain products, the same rows
        return weights, False


_SCRIPTED: Any = None


def _scripted() -> Any:
    """`_packed_forward` compiled by TorchScript once a process, or the function itself where that fails."""
    global _SCRIPTED
    if _SCRIPTED is None:
        try:
            with warnings.catch_warnings():  # torch 2.13 marks torch.jit.script deprecated; the fallback is below
                warnings.simplefilter("ignore", DeprecationWarning)
                _SCRIPTED = torch.jit.script(_packed_forward)
        except Exception as exc:
            log.info("the packed embedder runs op by op: TorchScript could not compile it (%s)", exc)
            _SCRIPTED = _packed_forward
    return _SCRIPTED


def _packed_forward(
    ids: Tensor,
    types: Tensor,
    positions: Tensor,
    lengths: list[int],
    tables: list[Tensor],
    weights: list[Tensor],
    biases: list[Tensor],
    norms: list[Tensor],
    heads: int,
    head_dim: int,
    eps: float,
    prepacked: bool,
    block: int,
) -> Tensor:
    """The embeddings and the encoder's layers over the packed tokens, then each text's mean, normalised.
    ids, types, positions: [T] → [n, D] fp32

    Each text attends to its own tokens only; every product runs on blocks of exactly `block` rows. The rows are
    padded once to a whole number of blocks (zero rows after the texts' tokens, which no text reads)."""
    total = ids.shape[0]
    short = (block - total % block) % block
    # As transformers' BertEmbeddings: words and token types, then positions, then LayerNorm (dropout is off).
    hidden = F.embedding(ids, tables[0]) + F.embedding(types, tables[1])
    hidden = hidden + F.embedding(positions, tables[2])
    hidden = F.layer_norm(hidden, [hidden.shape[1]], tables[3], tables[4], eps)
    width = hidden.shape[1]
    padding = hidden.new_zeros([short, width])
    hidden = torch.cat([hidden, padding])
    for layer in range(len(weights) // 4):
        qkv = _blocked(hidden, weights[4 * layer], biases[4 * layer], prepacked, block, "none")
        parts: list[Tensor] = []
        for part in qkv[:total].split(lengths):
            n = part.shape[0]
            q_k_v = part.view(n, 3, heads, head_dim).permute(1, 2, 0, 3).contiguous()  # [3, H, n, d]
            # Four dimensions ([1, H, n, d]): torch's fused (flash) attention for CPU, about half the math path's
            # time (~50 against ~100 us a call here); three would take the math path.
            attended = F.scaled_dot_product_attention(q_k_v[0:1], q_k_v[1:2], q_k_v[2:3])[0]
            parts.append(attended.transpose(0, 1).reshape(n, width))
        parts.append(padding)
        context = torch.cat(parts)
        out = _blocked(context, weights[4 * layer + 1], biases[4 * layer + 1], prepacked, block, "none")
        hidden = F.layer_norm(out + hidden, [width], norms[4 * layer], norms[4 * layer + 1], eps)
        inner = _blocked(hidden, weights[4 * layer + 2], biases[4 * layer + 2], prepacked, block, "gelu")
        out = _blocked(inner, weights[4 * layer + 3], biases[4 * layer + 3], prepacked, block, "none")
        hidden = F.layer_norm(out + hidden, [width], norms[4 * layer + 2], norms[4 * layer + 3], eps)
    means: list[Tensor] = []
    for part in hidden[:total].split(lengths):
        means.append(part.float().mean(dim=0))
    return F.normalize(torch.stack(means), p=2.0, dim=1)


def _blocked(rows: Tensor, weight: Tensor, bias: Tensor, prepacked: bool, block: int, activation: str) -> Tensor:
    """A linear layer, then `activation` ("none" or "gelu", the exact one), applied in calls of exactly `block`
    rows. [T, in] → [T, out], T a multiple of `block`

    Prepacked, the GELU runs inside the product (oneDNN's post-op) instead of as a pass of its own over the
    product's bfloat16 output."""
    outs: list[Tensor] = []
    for part in rows.split(block):
        if prepacked:
            no_scalars = torch.jit.annotate(list[_Number | None], [])
            algorithm = "none" if activation == "gelu" else ""  # GELU's "none": erf, not the tanh approximation
            outs.append(torch.ops.mkldnn._linear_pointwise(part, weight, bias, activation, no_scalars, algorithm))
        else:
            product = F.linear(part, weight, bias)
            outs.append(F.gelu(product) if activation == "gelu" else product)
    return outs[0] if len(outs) == 1 else torch.cat(outs)
