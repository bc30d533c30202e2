"""`premoe bench serve`, baselines: transformers with all experts, in-process, on the same requests.

Every baseline generates, for each request, exactly as many tokens as the server's lone reply to it (its real
tokens, up to and including EOS, capped by the request's max_new_tokens): EOS is switched off on the model's
generation_config (a `GenerationConfig(eos_token_id=None)` passed to `generate` is refilled from it) and each
request gets that length as its limit. A padded batch still runs until its longest row is done; only the rows'
own tokens count.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .serve_clients import Req


class HFBaselines:
    """transformers `AutoModelForCausalLM` with every expert, and the requests tokenized once.

    Args:
        model_dir: The original checkpoint (the store's source).
        requests: The fixed list.
        lengths: Tokens to generate per request (the server's lone replies' lengths).
        device: Torch device.
    """

    def __init__(self, model_dir: Path, requests: Sequence[Req], lengths: Sequence[int], device: torch.device) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        self.model = model.to(device).eval()
        self.model.generation_config.eos_token_id = None
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.prompts = [r.prompt for r in requests]
        self.ids = [list(self.tokenizer(p)["input_ids"]) for p in self.prompts]
        self.lengths = [max(1, int(n)) for n in lengths]
        self.tokens = sum(self.lengths)

    def _generate(self, rows: Sequence[int]) -> None:
        batch = self.tokenizer([self.prompts[i] for i in rows], return_tensors="pt", padding=True).to(self.device)
        width = max(self.lengths[i] for i in rows)
        with torch.no_grad():
            out = self.model.generate(
                **batch, max_new_tokens=width, do_sample=False, pad_token_id=self.pad_id, eos_token_id=None
            )
        if out.shape[1] - batch["input_ids"].shape[1] != width:
            raise RuntimeError(f"generate stopped after {out.shape[1] - batch['input_ids'].shape[1]} of {width}")

    def _timed(self, fn: Any) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        return {"tokens": self.tokens, "wall_s": wall, "tokens_per_s": self.tokens / wall}

    def alone(self) -> dict[str, Any]:
        """`generate` on each prompt alone."""

        def run() -> None:
            for i in range(len(self.ids)):
                self._generate([i])

        return self._timed(run)

    def padded(self, n: int) -> dict[str, Any]:
        """`generate` on left-padded batches of n consecutive prompts of the list."""

        def run() -> None:
            for start in range(0, len(self.ids), n):
                self._generate(range(start, min(start + n, len(self.ids))))

        return self._timed(run)

    def continuous(self, n: int) -> dict[str, Any]:
        """transformers continuous batching (the manager behind `generate_batch`) as a closed loop of n requests
        in flight, each with its own length; the manager's set-up is outside the timing. Errors are returned."""
        try:
            return self._continuous(n)
        except Exception as exc:  # the baseline is optional: report, do not crash the benchmark
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _continuous(self, n: int) -> dict[str, Any]:
        from transformers import ContinuousBatchingConfig

        longest = max(len(i) for i in self.ids) + max(self.lengths)
        page = 256
        blocks_per_request = math.ceil(longest / page) + 1
        config = ContinuousBatchingConfig(
            page_size=page,
            num_blocks=(n + 2) * blocks_per_request,
            max_batch_tokens=max(page, sum(sorted((len(i) for i in self.ids), reverse=True)[:n])),
            max_requests_per_batch=n,
        )
        generation = copy.deepcopy(self.model.generation_config)  # the manager rewrites eos_token_id in place
        generation.do_sample = False
        generation.eos_token_id = -1  # what the manager sets for None, without its warning
        total, tokens, finished, submitted = len(self.ids), 0, 0, 0
        with self.model.continuous_batching_context_manager(
            generation_config=generation, continuous_batching_config=config, block=True, timeout=10
        ) as manager:

            def submit(i: int) -> None:
                manager.add_request(self.ids[i], request_id=f"r{i}", max_new_tokens=self.lengths[i], eos_token_id=-1)

            start = time.perf_counter()
            for submitted in range(min(n, total)):
                submit(submitted)
            submitted = min(n, total)
            while finished < total:
                result = manager.get_result(timeout=30)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("the continuous batching thread stopped")
                    continue
                if not result.is_finished():
                    continue
                if result.error is not None:
                    raise RuntimeError(f"request {result.request_id}: {result.error}")
                finished += 1
                tokens += len(result.generated_tokens)
                if submitted < total:
                    submit(submitted)
                    submitted += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}
