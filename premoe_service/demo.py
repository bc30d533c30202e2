"""`make demo`: shard a model, start `premoe serve`, register a task, send prompts of several tasks, print a table
(explained column by column), the server's stats, and one completion over the OpenAI-compatible HTTP API.

Uses the reference model under models/reference-moe with its shipped profiles when they are there, and a
tiny random Qwen3-MoE with a few demo files otherwise. Everything runs through the real CLI, gRPC and HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .loopback import free_port, wait_serving

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "models" / "reference-moe"
TASKS = ROOT / "reference" / "tasks"
SHIPPED_PROFILES = ROOT / "profiles"

TINY_DEMOS = {
    "code": ["def add(a, b):\n    return a + b\n", "for i in range(3):\n    print(i)\n", "import os\nos.getcwd()\n"],
    "arithmetic": ["12+30=42", "7+8=15", "100+23=123", "45+45=90"],
    "prose": ["The river ran quietly under the old bridge.", "She opened the letter and began to read."],
}


def run(*args: str, quiet: bool = False) -> str:
    """Run a `premoe` verb in a subprocess; fail loudly with its output."""
    done = subprocess.run([sys.executable, "-m", "premoe_service.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"premoe {' '.join(args[:2])} failed:\n{done.stdout}{done.stderr}")
    if not quiet and done.stdout.strip():
        print(done.stdout.strip())
    return done.stdout


def prepare(work: Path) -> tuple[Path, Path, dict[str, Path], list[tuple[str, list[str]]]]:
    """Model dir, profiles dir, demo files of tasks to register live, and (prompt, stop strings) per task."""
    profiles = work / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    if (REFERENCE / "model.safetensors").exists() and TASKS.exists():
        names = sorted(p.name for p in TASKS.iterdir() if (p / "demos.jsonl").exists())
        for path in SHIPPED_PROFILES.glob("*.safetensors"):
            if path.stem != names[0]:
                (profiles / path.name).write_bytes(path.read_bytes())
        prompts = []
        for name in names:
            first = json.loads((TASKS / name / "eval.jsonl").read_text().splitlines()[0])
            prompt = first.get("prompt") or first["text"][:60]
            prompts.append((prompt, ["\n"] if "prompt" in first else []))
        return REFERENCE, profiles, {names[0]: TASKS / names[0] / "demos.jsonl"}, prompts

    from .families.tiny import save_tiny_checkpoint

    model_dir = work / "tiny-model"
    if not (model_dir / "config.json").exists():
        print("reference model not found: building a tiny random Qwen3-MoE for the demo")
        save_tiny_checkpoint(model_dir, "qwen3_moe")
    demo_files = {}
    for name, texts in TINY_DEMOS.items():
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        demo_files[name] = path
    prompts = [("def mul(a, b):\n", []), ("21+21=", []), ("The old house stood", []), ("zxqv blorf", [])]
    return model_dir, profiles, demo_files, prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=str(ROOT / "var" / "demo"), help="folder for the store and profiles")
    parser.add_argument("--budget", default="0.5", help="expert budget of the server")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, profiles, demo_files, prompts = prepare(work)

    print(f"== shard {model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir}")
    run("shard", str(model_dir), "--out", str(work / "store"), "--quiet")
    port, http_port = free_port(), free_port()
    print(f"== serve on 127.0.0.1:{port}, HTTP on {http_port} (embedded cache, budget {args.budget})")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "premoe_service.cli",
            "serve",
            "--store",
            str(work / "store"),
            "--profiles",
            str(profiles),
            "--port",
            str(port),
            "--budget",
            args.budget,
            "--device",
            "auto",
            "--http-port",
            str(http_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        try:
            wait_serving(server, f"127.0.0.1:{port}", timeout_s=600)
        except RuntimeError as exc:
            raise SystemExit(f"server did not start ({exc}):\n{server.stdout.read() if server.stdout else ''}") from exc
        from .client import PreMoeClient

        client = PreMoeClient(f"127.0.0.1:{port}", timeout=600)
        for name, path in demo_files.items():
            print(f"== register {name} from {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
            run("register", name, "--demos", str(path), "--server", f"127.0.0.1:{port}", "--replace")
        print("== tasks")
        run("tasks", "--server", f"127.0.0.1:{port}")
        rows = []
        for prompt, stop in prompts:
            reply = client.generate(prompt, max_new_tokens=args.max_new_tokens, stop=stop)
            s = reply.stats
            rows.append(
                (
                    prompt,
                    s.task or f"({s.decision})",
                    f"{s.score:.2f}",
                    f"{s.pattern_experts}/{s.total_experts}",
                    f"{s.loads.device}/{s.loads.cache}/{s.loads.disk}",
                    f"{s.coverage:.2f}",
                    f"{s.timings.total_ms:.0f}",
                    reply.text,
                )
            )
        client.close()
        print("== one request per prompt over gRPC")
        print_table(rows)
        print("== premoe stats")
        run("stats", "--server", f"127.0.0.1:{port}")
        print(f"== the same service over HTTP: POST http://127.0.0.1:{http_port}/v1/completions")
        http_completion(http_port, prompts[0][0], args.max_new_tokens)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        tail = server.stdout.read().strip().splitlines()[-2:] if server.stdout else []
        print(f"== server stopped (exit {code}): {' | '.join(tail)}")
    return 0


# The table's columns, each explained in one line under it.
COLUMNS = (
    ("prompt", "the prompt sent (newlines shown as \\n, cut at 40 characters)"),
    ("task", "the task whose pattern served it; (fallback) when retrieval found no task close enough"),
    ("score", "retrieval's similarity of the prompt to that task's demos (the match needs the route threshold)"),
    ("experts", "routed experts in the pattern / all routed experts of the model"),
    ("dev/cache/disk", "the pattern's experts found resident on the device / loaded from the cache / from disk"),
    ("cov", "coverage: the share of the full router's probability mass on the pattern's experts, mean over the prompt"),
    ("ms", "wall time of the request on the server, from its arrival to its last token"),
    ("output", "the generated text (greedy)"),
)


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    head = tuple(name for name, _ in COLUMNS)
    clean = [tuple(c.replace("\n", "\\n")[:40] for c in row) for row in [head, *rows]]
    widths = [max(len(row[i]) for row in clean) for i in range(len(head))]
    for n, row in enumerate(clean):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * width for width in widths))
    print()
    for name, meaning in COLUMNS:
        print(f"  {name:<15} {meaning}")


def http_completion(port: int, prompt: str, max_tokens: int) -> None:
    """One completion through the OpenAI-compatible door, with urllib (any OpenAI client works the same way)."""
    body = {"model": "auto", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.load(response)
    stats = reply.get("premoe", {})
    print(f"request  {json.dumps(body)}")
    print(f"text     {reply['choices'][0]['text']!r} (finish: {reply['choices'][0]['finish_reason']})")
    print(f"usage    {reply['usage']}")
    task, decision, score = stats.get("task") or "(fallback)", stats.get("decision"), stats.get("score", 0.0)
    print(f"routing  model {reply['model']!r} -> task {task} ({decision}, score {score:.2f})")


if __name__ == "__main__":
    sys.exit(main())
