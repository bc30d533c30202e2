"""`premoe bench serve`, baselines: transformers with all experts on the same requests, in a clean process of its own.

A user compares a server against transformers run on its own, not inside the server's process: torch's thread
count is process-wide and the server's threads would share the cores with it. So the baselines run in a worker
process (`BaselineProcess`) that holds only the model and waits on its stdin between runs; each run sets the
worker's torch threads (the benchmark measures 1 and all cores and keeps the best).

Every baseline generates, for each request, exactly as many tokens as the server's lone reply to it (its real
tokens, up to and including EOS, capped by the request's max_new_tokens): EOS is switched off on the model's
generation_config (a `GenerationConfig(eos_token_id=None)` passed to `generate` is refilled from it) and each
request gets that length as its limit. A padded batch still runs until its longest row is done; only the rows'
own tokens count.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from ...hf_compat import cache_keyword


class HFBaselines:
    """transformers `AutoModelForCausalLM` with every expert, and the requests tokenized once.

    Args:
        model_dir: The original checkpoint (the store's source).
        prompts: The fixed list's prompts.
        lengths: Tokens to generate per request (the server's lone replies' lengths).
        device: Torch device.
    """

    def __init__(self, model_dir: Path, prompts: Sequence[str], lengths: Sequence[int], device: torch.device) -> None:
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
        self.prompts = list(prompts)
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
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {
            "tokens": self.tokens,
            "wall_s": wall,
            "tokens_per_s": self.tokens / wall,
            "cpu_s": cpu,
            "tokens_per_cpu_s": self.tokens / cpu if cpu > 0 else None,
        }

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

    def forward_step(self, rows: int, kv_len: int, steps: int) -> dict[str, Any]:
        """transformers' own decode step: `rows` rows whose cache holds `kv_len` tokens (the prompts' tokens
        repeated, no padding), then `steps` timed steps of one forward pass plus the argmax; the median step."""
        from transformers import DynamicCache

        ids = [(self.ids[row % len(self.ids)] * kv_len)[:kv_len] for row in range(rows)]
        with torch.no_grad():
            cache = {cache_keyword(self.model): DynamicCache(config=self.model.config)}
            out = self.model(input_ids=torch.tensor(ids, device=self.device), logits_to_keep=1, **cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times, cpus = [], []
            for _ in range(steps):
                start, cpu = time.perf_counter(), time.process_time()
                out = self.model(input_ids=token, logits_to_keep=1, **cache)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                token.tolist()  # the token leaves the device, as a server's must
                times.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu)
        return {
            "rows": rows,
            "kv_len": kv_len,
            "step_ms": statistics.median(times) * 1e3,
            "cpu_ms": statistics.median(cpus) * 1e3,
            "steps": steps,
        }


class BaselineProcess:
    """The baselines in a worker process of their own: started once (the model loads once), then driven run by run
    over JSON lines; between runs it only waits on its stdin, so it takes no CPU while the server is measured.

    Args:
        model_dir: The original checkpoint.
        prompts: The fixed list's prompts.
        lengths: Tokens to generate per request.
        device: Torch device.
    """

    def __init__(self, model_dir: Path, prompts: Sequence[str], lengths: Sequence[int], device: torch.device) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - open for the worker's life, closed by close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "premoe_service.bench.serve.baselines"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        init = {"model": str(model_dir), "prompts": list(prompts), "lengths": list(lengths), "device": str(device)}
        self.ready = self._call(init)
        self.pid = self.process.pid

    def run(self, kind: str, threads: int, **args: Any) -> dict[str, Any]:
        """One baseline run (`alone`, `padded` n=, `continuous` n=, `forward_step` rows=, kv_len=, steps=) at
        `threads` torch threads; its figures plus the worker's pid and thread state."""
        return self._call({"kind": kind, "threads": threads, **args})

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps(message) + "\n")
            stdin.flush()
            line = stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self._stderr.seek(0)
            raise RuntimeError(f"the baseline process stopped: {self._stderr.read()[-2000:]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._stderr.close()

    def __enter__(self) -> BaselineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _main() -> None:
    """The worker of `BaselineProcess`: an init line, then one JSON reply per JSON command line."""
    out: IO[str] = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # whatever the libraries print must not mix with the replies
    init = json.loads(sys.stdin.readline())
    start = time.perf_counter()
    hf = HFBaselines(Path(init["model"]), init["prompts"], init["lengths"], torch.device(init["device"]))

    def reply(data: dict[str, Any]) -> None:
        out.write(json.dumps({**data, "pid": os.getpid(), "python_threads": threading.active_count()}) + "\n")
        out.flush()

    reply({"load_s": time.perf_counter() - start, "default_threads": torch.get_num_threads()})
    for line in sys.stdin:
        command = json.loads(line)
        kind, threads = command.pop("kind"), int(command.pop("threads"))
        torch.set_num_threads(threads)
        try:
            result = getattr(hf, kind)(**command) if kind in ("alone", "padded", "continuous", "forward_step") else {}
        except Exception as exc:  # reported to the benchmark, which goes on
            result = {"error": f"{type(exc).__name__}: {exc}"}
        reply({**result, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    _main()
