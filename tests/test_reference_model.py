"""The committed reference MoE checkpoint (models/reference-moe) and its task data (reference/tasks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reference import generated  # noqa: E402
from reference.corpus import TEXT_DOMAINS, read_jsonl  # noqa: E402
from reference.metrics import exact_match_accuracy, mean_token_nll  # noqa: E402

MODEL_DIR = REPO / "models" / "reference-moe"
TASKS_DIR = REPO / "reference" / "tasks"
TASK_NAMES = sorted(p.name for p in TASKS_DIR.iterdir() if p.is_dir()) if TASKS_DIR.is_dir() else []
EXACT_TASKS = sorted(generated.GENERATED_TASKS)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (MODEL_DIR / "model.safetensors").is_file(), f"reference checkpoint missing under {MODEL_DIR}"
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True, dtype=torch.float32)
    model.eval()
    return model, tok


def test_checkpoint_is_qwen3_moe_top2(model_and_tokenizer):
    model, tok = model_and_tokenizer
    cfg = model.config
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_experts >= 16
    assert cfg.num_experts_per_tok == 2
    assert cfg.norm_topk_prob is True
    moe_layers = [layer for layer in model.model.layers if type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock"]
    assert len(moe_layers) >= 4
    assert tok.bos_token and tok.eos_token and tok.pad_token
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert len(tok) <= cfg.vocab_size
    size_mb = sum(p.stat().st_size for p in MODEL_DIR.glob("*.safetensors")) / 2**20
    assert size_mb <= 45, f"checkpoint is {size_mb:.1f} MiB"


def test_tasks_have_demos_and_disjoint_eval():
    assert len(TASK_NAMES) >= 6, TASK_NAMES
    assert set(EXACT_TASKS) <= set(TASK_NAMES) and set(TEXT_DOMAINS) <= set(TASK_NAMES)
    for name in TASK_NAMES:
        demos = read_jsonl(TASKS_DIR / name / "demos.jsonl")
        evals = read_jsonl(TASKS_DIR / name / "eval.jsonl")
        assert 8 <= len(demos) <= 32, name
        assert len(evals) >= 200, name
        key = "prompt" if name in generated.GENERATED_TASKS else "text"
        for r in demos + evals:
            assert isinstance(r[key], str) and r[key]
            if key == "prompt":
                assert isinstance(r["answer"], str) and r["answer"] and "\n" not in r["answer"]
        demo_keys, eval_keys = {r[key] for r in demos}, {r[key] for r in evals}
        assert len(eval_keys) == len(evals), f"{name}: duplicate eval items"
        assert not demo_keys & eval_keys, f"{name}: demos overlap eval"


@pytest.mark.parametrize("name", EXACT_TASKS)
def test_generated_heldout_items_are_never_training_items(name):
    # The split of a generated prompt is a function of its text; training only draws "train" prompts.
    demos = read_jsonl(TASKS_DIR / name / "demos.jsonl")
    evals = read_jsonl(TASKS_DIR / name / "eval.jsonl")
    assert all(generated.split_of(r["prompt"]) == "demos" for r in demos)
    assert all(generated.split_of(r["prompt"]) == "eval" for r in evals)
    for r in demos + evals:  # answers are right
        prompt = r["prompt"]
        assert prompt.startswith(
            {"addition": "add: ", "reverse": "rev: ", "sort_digits": "sort: ", "date_format": "date: "}[name]
        )
    heldout = {r["prompt"] for r in demos + evals}
    stream = generated.training_stream(1234, {name: 1.0})
    drawn = [next(stream) for _ in range(20000)]
    assert all(generated.split_of(p) == "train" for _, p, _ in drawn)
    assert not heldout & {p for _, p, _ in drawn}


@pytest.mark.parametrize("name", EXACT_TASKS)
def test_exact_match_slice(model_and_tokenizer, name):
    model, tok = model_and_tokenizer
    records = read_jsonl(TASKS_DIR / name / "eval.jsonl")[:20]
    acc = exact_match_accuracy(model, tok, records, generated.GENERATED_TASKS[name].max_new_tokens)
    assert acc >= 0.8, f"{name}: {acc:.2f}"


def test_mean_token_nll_matches_direct_computation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    records = read_jsonl(TASKS_DIR / "python" / "eval.jsonl")[:2]
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:  # one at a time: no padding at all
            ids = torch.tensor([tok(r["text"])["input_ids"]])
            logits = model(input_ids=ids).logits[0]
            total += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert mean_token_nll(model, tok, records) == pytest.approx(total / count, rel=1e-4)


def test_exact_match_matches_direct_greedy(model_and_tokenizer):
    model, tok = model_and_tokenizer
    records = read_jsonl(TASKS_DIR / "addition" / "eval.jsonl")[:2]
    wrong = {"prompt": records[1]["prompt"], "answer": records[1]["answer"] + "9"}
    hits = 0
    with torch.no_grad():
        for r in (records[0], wrong):  # no cache, no padding
            ids = tok(r["prompt"])["input_ids"]
            new: list[int] = []
            for _ in range(8):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                if "\n" in tok.decode(new):
                    break
            hits += tok.decode(new, skip_special_tokens=True).split("\n")[0].strip() == r["answer"]
    assert exact_match_accuracy(model, tok, [records[0], wrong], 8) == pytest.approx(hits / 2)


def test_metrics_json_reports_every_task():
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    for name in TASK_NAMES:
        entry = metrics["tasks"][name]
        assert entry["metric"] == ("exact_match" if name in generated.GENERATED_TASKS else "mean_token_nll")
        if entry["metric"] == "exact_match":
            assert entry["value"] >= 0.8, (name, entry)
