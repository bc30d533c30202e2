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
makes a pass cheaper: all-MiniLM-L6-v2, 1 thread, 8 short prompts in one pass, 33.5 ms packed against 38.5 through
sentence-transformers in float32, 18.7 against 17.7 in bfloat16; one prompt 9.3 against 11.0 and 5.0 against 7.4.

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
        self.eps = float(config.layer_norm_eps)
        emb = bert.embeddings
        self._words = emb.word_embeddings.weight
        self._positions = emb.position_embeddings.weight
        self._types = emb.token_type_embeddings.weight
        self._norm = emb.LayerNorm
        self._layers = []
        for layer in bert.encoder.layer:
            own = layer.attention.self
            with torch.no_grad():  # query, key and value as one product: one call a block instead of three
                qkv = (
                    torch.cat([own.query.weight, own.key.weight, own.value.weight]).contiguous(),
                    torch.cat([own.query.bias, own.key.bias, own.value.bias]).contiguous(),
                )
            self._layers.append((qkv, layer.attention.output, layer.intermediate, layer.output))

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
            for (qkv_w, qkv_b), attn_out, intermediate, out in self._layers:
                context = self._attention(_blocked(hidden, qkv_w, qkv_b), lengths)
                hidden = attn_out.LayerNorm(_blocked(context, attn_out.dense.weight, attn_out.dense.bias) + hidden)
                inner = intermediate.intermediate_act_fn(
                    _blocked(hidden, intermediate.dense.weight, intermediate.dense.bias)
                )
                hidden = out.LayerNorm(_blocked(inner, out.dense.weight, out.dense.bias) + hidden)
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


def _blocked(rows: Any, weight: Any, bias: Any) -> Any:
    """`F.linear` in calls of exactly ROW_BLOCK rows (the last block filled with zero rows). [T, in] → [T, out]"""
    import torch
    import torch.nn.functional as F

    total = rows.shape[0]
    short = -total % ROW_BLOCK
    if short:
        rows = torch.cat([rows, rows.new_zeros(short, rows.shape[1])])
    if rows.shape[0] == ROW_BLOCK:
        return F.linear(rows, weight, bias)[:total]
    return torch.cat([F.linear(block, weight, bias) for block in rows.split(ROW_BLOCK)])[:total]
