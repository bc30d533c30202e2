"""The KV cache's keyword for the installed transformers: stepping a model's forward with it gives the logits of the
whole sequence's forward, and transformers warns about nothing (`past_key_values` is deprecated from 5.24)."""

from __future__ import annotations

import warnings

import pytest
import torch

from premoe_service.families.tiny import TINY_CONFIGS, tiny_model
from premoe_service.hf_compat import cache_keyword, output_cache


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_stepping_with_the_cache_keyword_gives_the_whole_forward(family: str) -> None:
    model = tiny_model(family).eval()
    ids = torch.tensor([[3, 5, 7, 11, 13, 17]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        whole = model(input_ids=ids).logits
        keyword = cache_keyword(model)
        out = model(input_ids=ids[:, :3], use_cache=True)
        stepped = [out.logits[:, -1]]
        for t in range(3, ids.shape[1]):
            cache = output_cache(out)
            assert cache is not None
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{keyword: cache})
            stepped.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(stepped, 1), whole[:, 2:], rtol=1e-5, atol=1e-5)


def test_a_forward_without_a_cache_returns_none() -> None:
    model = tiny_model("qwen3_moe").eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=False)
    assert output_cache(out) is None
