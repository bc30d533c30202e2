"""Train the reference Qwen3-MoE model (own BPE tokenizer, multi-domain corpus, generated tasks).

One command rebuilds everything (task files, tokenizer, checkpoint, metrics)::

    .venv/bin/python -m reference.train --out models/reference-moe

Seeded and deterministic for a given machine (corpus files found on it), thread count and torch build.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # allow `python reference/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from reference import corpus, generated
from reference.metrics import exact_match_accuracy, mean_token_nll

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"

#: share of training rows per stream ("tasks" = the generated exact-match examples, interleaved)
DEFAULT_MIX = {"python": 0.12, "c": 0.11, "prose": 0.09, "shell": 0.08, "tasks": 0.60}
#: share of generated examples per task inside the "tasks" stream
TASK_WEIGHTS = {"addition": 0.62, "reverse": 0.16, "sort_digits": 0.12, "date_format": 0.10}


def log(msg: str) -> None:
    print(msg, flush=True)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 unk_token=None, model_max_length=2048, clean_up_tokenization_spaces=False)
    hf.save_pretrained(out_dir)
    return hf


def encode_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """BOS doc EOS BOS doc EOS ... as one flat int32 array."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    backend = tokenizer.backend_tokenizer
    for i in range(0, len(docs), 2048):
        for enc in backend.encode_batch(docs[i:i + 2048]):
            ids.extend(enc.ids)
            ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def encode_task_stream(tokenizer, examples: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Generated examples as one flat stream plus a 0/1 array marking answer tokens (answer, newline, EOS)."""
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    ids: list[int] = []
    is_answer: list[int] = []
    for i in range(0, len(examples), 4096):
        part = examples[i:i + 4096]
        full = backend.encode_batch([generated.training_line(p, a) for p, a in part])
        prompts = backend.encode_batch([p for p, _ in part])
        for f, p in zip(full, prompts, strict=True):
            n = len(p.ids)
            assert f.ids[:n] == p.ids, "prompt tokenisation is not a prefix of the example's"
            ids.extend(f.ids)
            ids.append(eos)
            is_answer.extend([0] * n + [1] * (len(f.ids) - n + 1))
    return np.asarray(ids, dtype=np.int32), np.asarray(is_answer, dtype=np.int8)


def build_model(args, vocab_size: int, tokenizer):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        num_experts=args.experts, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
        router_aux_loss_coef=args.aux_coef, output_router_logits=False, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(cfg)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def routing_profile(model, tokenizer, records: list[dict]) -> list[list[float]]:
    """Per layer, the share of top-k routing selections each expert receives over the records' tokens."""
    model.eval()
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts)
    for r in records:
        text = r["text"] if "text" in r else r["prompt"] + r["answer"]
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        out = model(input_ids=ids, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            top = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(top, minlength=cfg.num_experts).float()
    return (counts / counts.sum(-1, keepdim=True)).tolist()


def evaluate(model, tokenizer, tasks: dict, limit: int | None = None) -> dict[str, dict]:
    res: dict[str, dict] = {}
    for name, recs in tasks.items():
        ev = recs["eval"][:limit] if limit else recs["eval"]
        if name in generated.GENERATED_TASKS:
            acc = exact_match_accuracy(model, tokenizer, ev, generated.GENERATED_TASKS[name].max_new_tokens)
            res[name] = {"metric": "exact_match", "value": round(acc, 4), "n": len(ev)}
        else:
            nll = mean_token_nll(model, tokenizer, ev)
            res[name] = {"metric": "mean_token_nll", "value": round(nll, 4), "n": len(ev)}
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/reference-moe"), help="checkpoint directory")
    ap.add_argument("--tasks-dir", type=Path, default=corpus.TASKS_DIR, help="where task demos/eval jsonl go")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 was fastest on the shared 2-core reference machine; use <= 2)")
    ap.add_argument("--steps", type=int, default=1700)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab-size", type=int, default=3072)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--moe-intermediate", type=int, default=192)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss coefficient")
    ap.add_argument("--task-loss", choices=("answer", "all"), default="answer",
                    help="train generated examples on their answer tokens only (default) or on every token")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=250, help="quick exact-match check (64 eval items)")
    ap.add_argument("--text-scale", type=float, default=1.0, help="scale the per-domain training text budget")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    # ---- corpus + task files
    budget = {k: int(v * args.text_scale) for k, v in corpus.DEFAULT_TEXT_BUDGET.items()}
    built = corpus.build(args.seed, budget, args.tasks_dir, log=log)
    tasks = built["tasks"]
    n_task_rows = int(args.steps * args.batch_size * DEFAULT_MIX["tasks"] * 1.1) + 64
    n_examples = n_task_rows * args.seq_len // 12
    stream = generated.training_stream(args.seed, TASK_WEIGHTS)
    task_examples = [(p, a) for _, p, a in (next(stream) for _ in range(n_examples))]
    task_lines = [generated.training_line(p, a) for p, a in task_examples]
    heldout = {r["prompt"] for name in generated.GENERATED_TASKS for s in ("demos", "eval") for r in tasks[name][s]}
    assert not heldout & {ln.split("=", 1)[0] + "=" for ln in task_lines}, "held-out prompt in training data"
    log(f"[data] {len(task_lines)} generated training examples; none of {len(heldout)} demo/eval prompts among them "
        f"({time.time() - t0:.0f}s)")

    # ---- tokenizer
    rng = random.Random(args.seed)
    tok_texts = [d[:4000] for name in corpus.TEXT_DOMAINS for d in built["text"][name]]
    tok_texts += rng.sample(task_lines, 20000)
    tokenizer = train_tokenizer(tok_texts, args.vocab_size, args.out)
    streams = {name: encode_stream(tokenizer, built["text"][name]) for name in corpus.TEXT_DOMAINS}
    streams["tasks"], task_answer_mask = encode_task_stream(tokenizer, task_examples)
    vocab = len(tokenizer)
    log(f"[data] tokenizer vocab {vocab}; stream tokens: " +
        ", ".join(f"{k}={len(v) / 1e6:.2f}M" for k, v in streams.items()) + f" ({time.time() - t0:.0f}s)")

    # ---- model
    model = build_model(args, vocab, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[model] Qwen3MoeForCausalLM {n_params / 1e6:.2f}M parameters: {args.layers} MoE layers x {args.experts} "
        f"experts (top-2), hidden {args.hidden}, moe_intermediate {args.moe_intermediate}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    names = list(DEFAULT_MIX)
    probs = np.array([DEFAULT_MIX[k] for k in names], dtype=np.float64)
    probs /= probs.sum()
    data_rng = np.random.default_rng(args.seed)
    task_cursor = 0
    T, B = args.seq_len, args.batch_size
    train_t0 = time.time()
    model.train()
    ema = None
    for step in range(args.steps):
        rows, label_rows = [], []
        for src in data_rng.choice(len(names), size=B, p=probs):
            s = streams[names[src]]
            if names[src] == "tasks":
                if task_cursor + T > len(s):
                    task_cursor = 0
                start = task_cursor
                task_cursor += T
            else:
                start = int(data_rng.integers(0, len(s) - T))
            row = torch.from_numpy(s[start:start + T].astype(np.int64))
            rows.append(row)
            if names[src] == "tasks" and args.task_loss == "answer":
                keep = torch.from_numpy(task_answer_mask[start:start + T].astype(np.bool_))
                row = row.masked_fill(~keep, -100)
            label_rows.append(row)
        x = torch.stack(rows)
        labels = torch.stack(label_rows)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        out = model(input_ids=x, labels=labels, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm = float(out.loss.detach()) - args.aux_coef * float(out.aux_loss.detach())
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - train_t0
            aux = float(out.aux_loss.detach())
            log(f"step {step:5d} lm {lm:.3f} (ema {ema:.3f}) aux {aux:.3f} lr {lr_at(step, args):.2e} "
                f"{(step + 1) * B * T / el:.0f} tok/s elapsed {el / 60:.1f} min")
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            quick = evaluate(model, tokenizer, {k: tasks[k] for k in generated.GENERATED_TASKS}, limit=64)
            log("  quick exact-match (64 eval items): " + ", ".join(f"{k}={v['value']:.2f}" for k, v in quick.items()))
            model.train()
    train_s = time.time() - train_t0

    # ---- save
    model.config.output_router_logits = False
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)

    # ---- final evaluation of the full model
    ev_t0 = time.time()
    results = evaluate(model, tokenizer, tasks)
    for name, r in results.items():
        log(f"[eval] {name:12s} {r['metric']:15s} {r['value']:.4f} (n={r['n']})")
    routing = {name: routing_profile(model, tokenizer, tasks[name]["demos"]) for name in tasks}
    info = {
        "tasks": results,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "eval_seconds": round(time.time() - ev_t0, 1),
        "steps": args.steps, "batch_size": B, "seq_len": T, "train_tokens": args.steps * B * T,
        "parameters": n_params, "seed": args.seed, "threads": args.threads,
        "mix": DEFAULT_MIX, "task_weights": TASK_WEIGHTS,
        "torch": torch.__version__, "python": platform.python_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sources": {k: {"description": d.description, "paths": list(d.paths)} for k, d in corpus.TEXT_DOMAINS.items()},
        "routing_on_demos": routing,
    }
    (args.out / "metrics.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"[done] training {train_s / 60:.1f} min, total {(time.time() - t0) / 60:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
