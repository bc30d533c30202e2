"""A small slice of `premoe eval` end to end, checked against transformers computing the metrics directly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from premoe_service.cli import main as cli
from premoe_service.evaluation import EvalItem, evaluate_grid, load_task_data, markdown, retention
from premoe_service.families.tiny import save_tiny_checkpoint, tiny_tokenizer
from premoe_service.profiler import Demo, Selection, profile_store, select
from premoe_service.store import Store, shard

from .references import masked_transformers

PROMPTS = ["ab=", "hello ", "x+y=", "12+5=", "def f", "Zq: ", "red, ", "0 1 2 ", "(a) ", "The "]
TEXTS = ["the quick brown fox jumps", "lorem ipsum dolor sit amet", "print(sum(range(10)))", "a b c d e f g"]


def hf_answer(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True).split("\n", 1)[0].strip()


def hf_nll(model, tokenizer, texts: list[str]) -> float:
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("eval")
    model = save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    store = Store(root / "store")
    tokenizer = tiny_tokenizer()
    # Answers are the full model's own greedy outputs: the full model scores 1.0, patterns lose some.
    exact = [{"prompt": p, "answer": hf_answer(model, tokenizer, p, 4)} for p in PROMPTS]
    for name, records in (("echo", exact), ("text", [{"text": t} for t in TEXTS])):
        (root / "tasks" / name).mkdir(parents=True)
        (root / "tasks" / name / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    profiles = {}
    for name, demos in (("echo", [Demo(p) for p in PROMPTS[:4]]), ("text", [Demo(t) for t in TEXTS[:2]])):
        profile, _ = profile_store(store, name, demos)
        profile.save(root / f"{name}.safetensors")
        profiles[name] = profile
    return root, model, store, tokenizer, profiles


def test_eval_slice_matches_direct_computation(setup) -> None:
    root, model, store, tokenizer, profiles = setup
    data = load_task_data(root / "tasks", ["echo", "text"], None)
    budgets = [0.5, 0.25]
    # Answers were cut at 4 tokens, so decoding gets exactly the answer length (margin 0).
    result = evaluate_grid(
        store,
        profiles,
        data,
        criteria=["tcess"],
        budgets=budgets,
        progress=False,
        answer_margin=0,
        router=lambda prompt: "echo",
    )

    # The retrieval figure says what it covers: these tasks' eval prompts (a router that always says "echo").
    counts = {name: min(len(task.items), 50) for name, task in data.items()}
    assert result.retrieval_tasks == ["echo", "text"] and result.retrieval_prompts == sum(counts.values())
    assert result.retrieval_top1 == counts["echo"] / sum(counts.values())
    label = markdown(result).splitlines()[-1]
    assert label.startswith("Retrieval top-1 accuracy over the eval prompts of the 2 evaluated tasks (echo, text;")
    assert f"{sum(counts.values())} prompts" in label and label.endswith(f"{result.retrieval_top1:.3f}")
    assert result.full["echo"] == 1.0
    assert math.isclose(result.full["text"], hf_nll(model, tokenizer, TEXTS), rel_tol=1e-5)
    for budget in budgets:
        for task in ("echo", "text"):
            pattern = select(profiles[task].score("tcess"), store_spec(store), Selection("tcess", "budget", budget))
            with masked_transformers(model, dict(pattern.layers)):
                if task == "echo":
                    items = data["echo"].items
                    hits = [hf_answer(model, tokenizer, i.prompt, 4) == i.answer for i in items]
                    expected = sum(hits) / len(items)
                else:
                    expected = hf_nll(model, tokenizer, TEXTS)
            measured = result.grid[task]["tcess"][f"{budget:g}"]
            assert math.isclose(measured, expected, rel_tol=1e-5, abs_tol=1e-9), (task, budget, measured, expected)
            assert math.isclose(
                result.retention[task]["tcess"][f"{budget:g}"],
                retention(result.metric[task], result.full[task], expected),
                rel_tol=1e-5,
            )
    assert abs(result.grid["text"]["tcess"]["0.25"] - result.full["text"]) > 1e-4  # the pattern has an effect
    assert set(result.cross) == {"echo", "text"} and all(len(row) == 2 for row in result.cross.values())


def store_spec(store: Store):
    from transformers import AutoConfig

    from premoe_service.families import adapter_for

    config = AutoConfig.from_pretrained(store.dir)
    return adapter_for(config).spec(config)


def test_eval_command_writes_reports(setup, tmp_path: Path) -> None:
    root, *_ = setup
    code = cli(
        [
            "eval",
            "--store",
            str(root / "store"),
            "--profiles",
            str(root),
            "--data",
            str(root / "tasks"),
            "--tasks",
            "echo,text",
            "--criteria",
            "tcess,random",
            "--budgets",
            "0.5,0.25",
            "--out",
            str(tmp_path),
            "--quiet",
            "--no-retrieval",
        ]
    )
    assert code == 0
    table = (tmp_path / "eval.md").read_text()
    assert "| echo | accuracy |" in table and "random" in table
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["retention"]["text"]) == {"tcess", "random"}
    assert (tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_items_name_bad_lines(tmp_path: Path) -> None:
    from premoe_service.errors import InvalidArgument
    from premoe_service.evaluation import load_eval_items

    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"question": 1}\n')
    with pytest.raises(InvalidArgument, match="line 2"):
        load_eval_items(path)
    assert EvalItem(prompt="a", answer="b").exact
