"""A sentence-transformers BERT encoder run packed: a text's vector does not depend on the texts beside it.

sentence-transformers pads a pass's texts to its longest and multiplies all their rows at once. Both move a text's
vector with its pass: attention runs over the padding, and a matrix product's kernel (oneDNN for bfloat16, MKL for
float32) picks its blocking from the number of rows, which changes how a row's sums are rounded (measured on this
project's machine: a row of the 1536-wide bfloat16 product came out one bfloat16 step apart in passes of 9 and 109
rows). In bfloat16 a vector then moved by up to ~2e-3 with its pass, so a prompt near a tie between two tasks could
be routed one way alone and another beside other prompts.

Here every text's tokens are laid end to end in one sequence, with no padding: attention runs per text over its own
tokens, and every product runs on blocks of exactly ROW_BLOCK rows (the last one filled with zero rows), so each row
always meets the same kernel with the same blocking. A text's vector is then a function of the text, the weights
and the thread count alone: the same bits alone and in any pass (`tests/test_embedder_packed.py`). No padding also
makes a pass cheaper: all-MiniLM-L6-v2, float32, 1 thread, 8 short prompts in one pass 33.5 ms packed against 38.5
through sentence-transformers, one prompt 9.3 against 11.0 (bfloat16: docs/serving.md).

What runs packed: a `Transformer` module over a transformers `BertModel` (absolute positions, an encoder), then
mean `Pooling`, then optionally `Normalize`; tokenized by the model's own `preprocess`, so its truncation and
special tokens hold. Any other model is encoded by sentence-transformers (`unsupported` says why).
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
    mode = modules[1].pooling_mode
    if (mode if isinstance(mode, str) else tuple(mode)) not in ("mean", ("mean",)):
        return f"pooling {mode!r}, not mean"
    return None


class PackedEncoder:
    """Encodes texts with a supported sentence-transformers model's own weights (`unsupported`), packed.

    Args:
        model: The loaded `SentenceTransformer`, its weights already in the dtype to run in (float32 or bfloat16).
    """

    def __init__(self, model: Any) -> None:
        import torch

        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"this model cannot run packed: {reason}")
        self._model = model
        bert = model[0].auto_model
        config = bert.config
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        emb = bert.embeddings
        self._words = emb.word_embeddings.weight
        self._positions = emb.position_embeddings.weight
        self._types = emb.token_type_embeddings.weight
        self._norm = emb.LayerNorm
        self._layers = []
        for layer in bert.encoder.layer:
            own = layer.attention.self
            with torch.no_grad():  # query, key and value as one product: one call a block instead of three
                qkv = _Blocked(
                    torch.cat([own.query.weight, own.key.weight, own.value.weight]),
                    torch.cat([own.query.bias, own.key.bias, own.value.bias]),
                )
            out = layer.attention.output
            self._layers.append(
                (
                    qkv,
                    _Blocked(out.dense.weight, out.dense.bias),
                    out.LayerNorm,
                    _Blocked(layer.intermediate.dense.weight, layer.intermediate.dense.bias),
                    layer.intermediate.intermediate_act_fn,
                    _Blocked(layer.output.dense.weight, layer.output.dense.bias),
                    layer.output.LayerNorm,
                )
            )

    def encode(self, texts: list[str]) -> np.ndarray:
        """One row per text, L2-normalised in float32. [n, dim] float32"""
        import torch
        import torch.nn.functional as F

        features = self._model.preprocess(texts)
        mask = features["attention_mask"].bool()
        lengths = mask.sum(dim=1).tolist()
        ids = features["input_ids"][mask]  # [T]: the texts' tokens end to end
        types = features["token_type_ids"][mask] if "token_type_ids" in features else torch.zeros_like(ids)
        positions = torch.cat([torch.arange(n) for n in lengths])
        device = self._words.device
        ids, types, positions = ids.to(device), types.to(device), positions.to(device)
        with torch.inference_mode():
            # As transformers' BertEmbeddings: words and types, then positions, then LayerNorm (dropout is off).
            hidden = self._words[ids] + self._types[types]
            hidden = self._norm(hidden + self._positions[positions])
            for qkv, attn_dense, attn_norm, up, act, down, norm in self._layers:
                hidden = attn_norm(attn_dense(self._attention(qkv(hidden), lengths)) + hidden)
                hidden = norm(down(act(up(hidden))) + hidden)
            pooled = torch.stack([part.float().mean(dim=0) for part in hidden.split(lengths)])
            vectors = F.normalize(pooled, p=2, dim=1)
        return np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)

    def _attention(self, qkv: Any, lengths: list[int]) -> Any:
        """Each text's tokens attend to its own only. qkv: [T, 3 * hidden] → [T, hidden]"""
        import torch
        import torch.nn.functional as F

        parts = []
        for part in qkv.split(lengths):
            n = part.shape[0]
            q, k, v = part.view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3).contiguous()  # 3 x [H, n, d]
            parts.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Blocked:
    """A linear layer applied in calls of exactly ROW_BLOCK rows (the last block filled with zero rows).

    bfloat16 weights on a CPU are packed once into oneDNN's blocked layout for ROW_BLOCK rows, as inductor's weight
    freezing does: `F.linear` reorders a bfloat16 weight on every call, which was a third of a lone prompt's
    products (all-MiniLM-L6-v2's 24 products of 32 rows, 1 thread: 1.83 ms packed against 2.66, the same bits).
    float32 gains nothing from it (MKL: 6.9 against 7.0 ms) and keeps `F.linear`.
    """

    def __init__(self, weight: Any, bias: Any) -> None:
        import torch

        self.weight, self.bias = weight.detach().contiguous(), bias.detach().contiguous()
        self._packed = None
        if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, ROW_BLOCK)
            except (RuntimeError, AttributeError):  # a build without the op: plain products, the same rows
                self._packed = None

    def _call(self, rows: Any) -> Any:
        import torch
        import torch.nn.functional as F

        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(rows, self._packed, self.bias, "none", [], "")
        return F.linear(rows, self.weight, self.bias)

    def __call__(self, rows: Any) -> Any:
        """[T, in] → [T, out]"""
        import torch

        total = rows.shape[0]
        short = -total % ROW_BLOCK
        if short:
            rows = torch.cat([rows, rows.new_zeros(short, rows.shape[1])])
        if rows.shape[0] == ROW_BLOCK:
            return self._call(rows)[:total]
        return torch.cat([self._call(block) for block in rows.split(ROW_BLOCK)])[:total]
