"""The decoder stack run directly: what a causal LM's forward computes, without transformers' wrappers around it.

A transformers causal LM's forward wraps its decoder stack in layers of generic code: keyword defaults merged from
the config, output capturing, mask construction, output dataclasses, logits slicing. At this project's model sizes
a decode step is mostly such Python; the wrappers cost about 7% of a one-row step on the reference model. For a
family whose forward is the plain stack (`FamilyAdapter.plain_stack`, checked for each family against transformers
5.x), the engine runs the same modules in the same order with the same arguments, so the logits are the same bits;
`tests/test_decoder_stack.py` checks that for every family against the model's own forward.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..families import adapter_for

# Inductor's C++ wrapper: a graph's glue (buffers, views, the library calls between its kernels) runs as compiled C++
# rather than as a generated Python function, with the GIL released for the whole graph (the Python operators it
# calls take it back), so that the server's other threads run while it computes (`tests/test_compiled_gil.py`). The
# engine's compiled stack (`engine/compiled_stack.py`) and the router signal's plain pass (`router_signal.py`)
# compile with these options on a CPU. On the reference model a decode step at 16 rows 4.28 -> 3.70-3.81 ms and at
# one row 1.65 -> 1.52 (`premoe bench step`'s setup); compiling takes about as long (the compiled stack's tests on a
# cold cache: 7 min 27 s with it, 8 min 20 s without), and a warm cache starts the server as fast. On a GPU the
# graphs keep the Python wrapper (Triton kernels launched from it; the C++ wrapper is not measured there).
INDUCTOR_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}


def plain_stack(model: nn.Module) -> DecoderStack | None:
    """The stack of `model` when its family runs a plain one (and the model has the expected parts), else None."""
    inner = getattr(model, "model", None)
    parts = ("embed_tokens", "rotary_emb", "layers", "norm")
    if not adapter_for(model.config).plain_stack or inner is None or not all(hasattr(inner, p) for p in parts):
        return None
    if not hasattr(model, "lm_head"):
        return None
    return DecoderStack(model)


class DecoderStack:
    """Runs `model`'s decoder stack on packed ids; returns the logits of the kept positions."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, ids: Tensor, position_ids: Tensor, attention_mask: Any, keep: Tensor) -> Tensor:
        """`ids`, `position_ids` `[1, T]`; `attention_mask` as the layers take it; `keep` `[K]` positions whose
        logits come out: `[1, K, V]`."""
        inner: Any = self.model.model
        hidden = inner.embed_tokens(ids)
        position_embeddings = inner.rotary_emb(hidden, position_ids)
        for layer in inner.layers[: inner.config.num_hidden_layers]:
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                position_embeddings=position_embeddings,
            )
        hidden = inner.norm(hidden)
        logits: Tensor = self.model.lm_head(hidden[:, keep, :])  # type: ignore[operator]
        return logits
