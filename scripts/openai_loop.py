"""The outsiders' loop: N official `openai` clients, default arguments, in a closed loop against `premoe serve` as
shipped, then transformers' left-padded batches of the same requests in a clean process of its own.

    python -m scripts.openai_loop                                   # 16 clients, reference/loop/prompts.txt
    python -m scripts.openai_loop --prompts my-prompts.txt --clients 4 --max-tokens 64

Each client has its own `openai.OpenAI` and sends every prompt of the file (one a line) in turn, client c starting
at prompt c, greedy, `max_tokens` each, as `/v1/completions` calls to the server's HTTP API; a round ends when the
last client is done, and counts the replies' tokens (`usage.completion_tokens`). The server then stops, and
transformers runs in a fresh process: batch j holds client c's j-th prompt for every c, left-padded, each batch
generating as many tokens as its longest reply (so it makes every real token the server made), at 1 thread and
at all usable cores. Prints both sides' tokens/s per round and the ratio of the medians to transformers' best.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _loop(base: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[float, dict[int, int]]:
    """One closed-loop round; returns its tokens/s and each prompt's reply length."""
    from openai import OpenAI

    model = OpenAI(base_url=base, api_key="unused").models.list().data[0].id
    totals = [0] * clients
    lengths: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(c: int) -> None:
        client = OpenAI(base_url=base, api_key="unused")
        try:
            for j in range(len(prompts)):
                i = (j + c) % len(prompts)
                reply = client.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0)
                assert reply.usage is not None
                totals[c] += reply.usage.completion_tokens
                lengths[i] = reply.usage.completion_tokens
        except BaseException as exc:  # reported once the round ends
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} clients failed, the first with {errors[0]!r}")
    return sum(totals) / wall, lengths


def _transformers(model: str, prompts: list[str], lengths: list[int], clients: int, rounds: int, threads: int) -> Any:
    """The baseline's worker, in a process of its own: tokens/s of the padded batches, one figure per round."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    batches = [[(j + c) % len(prompts) for c in range(clients)] for j in range(len(prompts))]

    def run(batch: list[int]) -> int:
        inputs = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True)
        longest = max(lengths[i] for i in batch)
        with torch.no_grad():
            lm.generate(
                **inputs,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return sum(lengths[i] for i in batch)

    run(batches[0][:2])  # warm
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        tokens = sum(run(batch) for batch in batches)
        rates.append(tokens / (time.perf_counter() - start))
    return {"threads": torch.get_num_threads(), "tok_s": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=Path("reference/loop/prompts.txt"), help="one prompt a line")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, each its own openai.OpenAI")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each side (after one warm round)")
    parser.add_argument("--max-tokens", type=int, default=24, help="each completion's max_tokens")
    parser.add_argument("--store", type=Path, default=Path("var/reference-store"), help="the shard store served")
    parser.add_argument("--profiles", type=Path, default=Path("profiles"), help="the task profiles served")
    parser.add_argument("--model", default="models/reference-moe", help="the checkpoint transformers runs")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `premoe serve` flag (repeatable)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the baseline's process, at these threads
    args = parser.parse_args()
    if args.worker is not None:
        job = json.loads(sys.stdin.read())
        result = _transformers(args.model, job["prompts"], job["lengths"], args.clients, args.rounds, args.worker)
        print(json.dumps(result))
        return
    for name in ("clients", "rounds", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.prompts.is_file():
        parser.error(f"--prompts: no file {args.prompts}")
    prompts = [line for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts:
        parser.error(f"--prompts: {args.prompts} holds no prompt")

    from premoe_service.cores import usable_cores
    from premoe_service.loopback import free_port, premoe_server

    http = free_port()
    base = f"http://127.0.0.1:{http}/v1"
    with premoe_server(args.store, args.profiles, ["--http-port", str(http), *args.serve_arg]):
        _loop(base, prompts, args.clients, args.max_tokens)  # warm: every prompt's task and graphs once
        ours: list[float] = []
        lengths: dict[int, int] = {}
        for _ in range(args.rounds):
            rate, lengths = _loop(base, prompts, args.clients, args.max_tokens)
            ours.append(rate)

    job = json.dumps({"prompts": prompts, "lengths": [lengths[i] for i in range(len(prompts))]})
    baselines = {}
    for threads in sorted({1, usable_cores()}):
        worker = [sys.executable, "-m", "scripts.openai_loop", "--worker", str(threads), "--model", args.model]
        worker += ["--clients", str(args.clients), "--rounds", str(args.rounds)]
        done = subprocess.run(worker, input=job, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the transformers baseline failed:\n{done.stderr[-2000:]}")
        baselines[threads] = json.loads(done.stdout.strip().splitlines()[-1])["tok_s"]

    print(f"{args.clients} openai clients, {len(prompts)} prompts each, max_tokens {args.max_tokens}, greedy")
    print(f"ours (premoe serve, {' '.join(args.serve_arg) or 'default flags'}): " + _rates(ours))
    for threads, rates in baselines.items():
        print(f"transformers, left-padded batches, {threads} thread{'s' if threads > 1 else ''}: " + _rates(rates))
    best = max(statistics.median(r) for r in baselines.values())
    print(f"ours / transformers' best: {statistics.median(ours) / best:.2f}x")


def _rates(rates: list[float]) -> str:
    return f"median {statistics.median(rates):.0f} tok/s (rounds {', '.join(f'{r:.0f}' for r in rates)})"


if __name__ == "__main__":
    main()
