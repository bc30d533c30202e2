"""The combined decision rule against a calibrated classifier, and the similarity floor, measured on the demos and
the off-topic background alone.

Training items are what calibration scores (`retrieval.calibrate`): each demo against the other demos, the lines of
longer demos with their own demo left out, and each background prompt left out of the none-class. The classifier
is a conditional logit: one score per candidate (the shortlisted tasks and the none-class) from the same signals
the rule reads (embedding similarity, router-input score, router-distribution cosine; raw and z-normalised across
the candidates, and a none-class indicator), weights shared by all tasks so that a new task needs no training,
softmax over the candidates, background items weighted to the positives' total. Both are scored by 5-fold cross
validation grouped by demo and by background category, so no item is judged by a model that saw it or its
siblings. `--queries` adds the figures on a labelled set, for reporting only: nothing here is chosen on it.

Run it as `python -m premoe_service.bench.route.classifier --store var/reference-store --profiles profiles
--background reference/offtopic/background.jsonl [--queries reference/heldout/queries.jsonl]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ...retrieval import Embedder, LocalProfileStore, Registry, RoutePolicy, load_route_records
from ...retrieval.decision import decide_combined
from ...retrieval.evidence import PromptEvidence
from ...retrieval.task_leads import _LeaveOneOut, positive_items
from ...runtime.router_signal import RouterFeatures, RouterSignal

FEATURE_SETS = ("z", "raw", "raw+z")


@dataclasses.dataclass(frozen=True)
class Item:
    """One scored prompt: its fold group, its label (None: off-topic), its shortlist and router evidence."""

    group: str
    label: str | None
    ranked: list[tuple[str, float]]
    evidence: PromptEvidence


def training_items(registry: Registry, categories: Sequence[str]) -> list[Item]:
    """Demos, demo lines and background prompts, each scored with itself (or its demo) left out."""
    evidence = registry.evidence
    background = None if evidence is None else evidence.background()
    if evidence is None or background is None:
        raise SystemExit("the router signal and a background are needed")
    scorer = _LeaveOneOut(registry, evidence)
    items = [
        Item(f"{name}:{i}", name, *scorer.signals(vector, features, (name, i), None))
        for name, i, vector, features in positive_items(registry, evidence)  # the same items as calibration
    ]
    bg_vectors, bg_features = background
    for b in range(bg_vectors.shape[0]):
        row = RouterFeatures(bg_features.scores[b : b + 1], bg_features.inputs[b : b + 1])
        items.append(Item(f"background:{categories[b]}", None, *scorer.signals(bg_vectors[b], row, None, b)))
    return items


def query_items(registry: Registry, path: Path) -> list[Item]:
    """A labelled set's prompts scored against every demo and the whole background."""
    assert registry.evidence is not None
    records = load_route_records(path)
    scorer = _LeaveOneOut(registry, registry.evidence)
    vectors = registry.embedder.encode([r.query for r in records])
    features = registry.evidence.signal.features([r.query for r in records])
    return [
        Item(
            f"query:{k}",
            r.task,
            *scorer.signals(
                vectors[k], RouterFeatures(features.scores[k : k + 1], features.inputs[k : k + 1]), None, None
            ),
        )
        for k, r in enumerate(records)
    ]


def candidate_features(item: Item, kind: str) -> tuple[list[str | None], np.ndarray]:
    """The candidates (shortlisted tasks, then None for the none-class) and their features. [c, f]"""
    tasks = [task for task, _ in item.ranked if task in item.evidence.inputs]
    similarity, found = dict(item.ranked), item.evidence
    none = (found.none_similarity, found.none_inputs, found.none_distribution)
    raw = np.array(
        [[similarity[t], found.inputs[t], found.distribution[t]] for t in tasks] + [[float(v or 0.0) for v in none]]
    )  # [c, 3]
    spread = raw.std(axis=0)
    z = np.where(spread > 1e-9, (raw - raw.mean(axis=0)) / np.maximum(spread, 1e-9), 0.0)
    is_none = np.zeros((len(tasks) + 1, 1))
    is_none[-1] = 1.0
    columns = {"z": [z, is_none], "raw": [raw, is_none], "raw+z": [raw, z, is_none]}[kind]
    return [*tasks, None], np.concatenate(columns, axis=1)


@dataclasses.dataclass
class Classifier:
    """Shared weights over candidate features, standardised on the training items."""

    kind: str
    weights: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    margin: float = 0.0

    def decide(self, item: Item) -> tuple[str | None, str | None]:
        """(top task, decided task or None): the best task, kept when it outscores the none-class by `margin`."""
        top, lead = self.lead(item)
        return top, top if lead >= self.margin else None

    def lead(self, item: Item) -> tuple[str | None, float]:
        """The best task and its score minus the none-class's."""
        names, x = candidate_features(item, self.kind)
        scores = ((x - self.mean) / self.scale) @ self.weights
        top = int(np.argmax(scores[:-1]))
        return names[top], float(scores[top] - scores[-1])


def margin_at_loss(leads: Sequence[float], loss: float) -> float:
    """The highest margin that refuses at most `loss` of the positives' `leads`."""
    ordered = np.sort(np.asarray(leads))
    return float(ordered[min(len(ordered) - 1, int(np.floor(loss * len(ordered))))])


def fit(items: Sequence[Item], kind: str, l2: float) -> Classifier:
    """A softmax over each item's candidates, background items weighted to the positives' total (L-BFGS)."""
    candidates = [(candidate_features(item, kind), item.label) for item in items]
    rows = [(x, names.index(label)) for (names, x), label in candidates if label in names]
    stacked = np.concatenate([x for x, _ in rows])
    mean, scale = stacked.mean(axis=0), stacked.std(axis=0) + 1e-9
    # Tasks fill the first slots, the none-class the last one, masked padding lies between. [n, width, f]
    width = max(x.shape[0] for x, _ in rows)
    x = torch.zeros(len(rows), width, stacked.shape[1], dtype=torch.float64)
    mask = torch.full((len(rows), width), float("-inf"), dtype=torch.float64)
    target = torch.zeros(len(rows), dtype=torch.long)
    for r, (features, y) in enumerate(rows):
        tasks = features.shape[0] - 1
        standard = torch.from_numpy((features - mean) / scale)
        x[r, :tasks], x[r, -1] = standard[:tasks], standard[-1]
        mask[r, :tasks] = mask[r, -1] = 0.0
        target[r] = width - 1 if y == tasks else y
    negative = target == width - 1
    weight = torch.where(negative, (~negative).sum() / negative.sum().clamp(min=1), torch.tensor(1.0)).double()
    w = torch.zeros(stacked.shape[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logp = torch.log_softmax(x @ w + mask, dim=-1).gather(1, target[:, None])[:, 0]
        loss = -(weight * logp).sum() / weight.sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return Classifier(kind, w.detach().numpy(), mean, scale)


def rule(policy: RoutePolicy) -> Callable[[Item], tuple[str | None, str | None]]:
    """The shipped decision (`decision.decide_combined`) under `policy`, as (top task, decided task)."""

    def decide(item: Item) -> tuple[str | None, str | None]:
        decision = decide_combined(item.ranked, item.evidence, policy)
        return (decision.ranked[0][0] if decision.ranked else None), decision.task

    return decide


def folds(items: Sequence[Item], k: int = 5) -> list[int]:
    groups = sorted({item.group for item in items})
    order = np.random.default_rng(0).permutation(len(groups))
    fold = {group: int(order[i]) % k for i, group in enumerate(groups)}
    return [fold[item.group] for item in items]


def summary(name: str, items: Sequence[Item], decided: Sequence[tuple[str | None, str | None]]) -> str:
    tasks = sorted({item.label for item in items if item.label is not None})
    per = {t: np.mean([d[0] == t for i, d in zip(items, decided, strict=True) if i.label == t]) for t in tasks}
    on = [d for i, d in zip(items, decided, strict=True) if i.label is not None]
    off = [d for i, d in zip(items, decided, strict=True) if i.label is None]
    top1 = np.mean([d[0] == i.label for i, d in zip(items, decided, strict=True) if i.label is not None])
    worst = min(per, key=lambda t: per[t])
    rejected = np.mean([d[1] is None for d in off]) if off else float("nan")
    return (
        f"{name:<44} top-1 {top1:.3f} (worst {worst} {per[worst]:.2f}); off-topic rejected {rejected:.3f}, "
        f"on-task lost {np.mean([d[1] is None for d in on]):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("--store", "--profiles", "--background"):
        parser.add_argument(name, required=True, type=Path)
    parser.add_argument("--queries", type=Path, help="labelled JSONL to report on (never used to choose)")
    parser.add_argument("--embedder", help="local sentence-transformers model (default: all-MiniLM-L6-v2)")
    args = parser.parse_args()
    from ...store import Store

    lines = [json.loads(line) for line in args.background.read_text(encoding="utf-8").splitlines() if line.strip()]
    registry = Registry(
        LocalProfileStore(args.profiles),
        embedder=Embedder(args.embedder),
        signal=RouterSignal.from_store(Store(args.store)),
        background=[line["query"] for line in lines],
    )
    items = training_items(registry, [line.get("category", str(i)) for i, line in enumerate(lines)])
    print(f"{len(items)} training items ({sum(i.label is None for i in items)} background), 5 grouped folds")
    base = registry.policy
    for floor in (0.0, 0.05, 0.10, 0.15, 0.16, 0.18):
        policy = dataclasses.replace(base, background_floor=floor)
        print(summary(f"rule, lead {base.min_lead}, floor {floor:.2f}", items, [rule(policy)(i) for i in items]))
    fold_of = folds(items)
    ruled = [rule(base)(i) for i in items]
    loss = float(np.mean([d[1] is None for i, d in zip(items, ruled, strict=True) if i.label is not None]))
    best: tuple[float, Classifier] | None = None
    for kind in FEATURE_SETS:
        for l2 in (1e-3, 1e-2, 1e-1):
            leads: list[tuple[str | None, float]] = [(None, 0.0)] * len(items)
            for f in range(5):
                model = fit([i for i, g in zip(items, fold_of, strict=True) if g != f], kind, l2)
                for n, (item, g) in enumerate(zip(items, fold_of, strict=True)):
                    if g == f:
                        leads[n] = model.lead(item)
            # Compared where the rule stands: the margin that loses the rule's share of the positives.
            margin = margin_at_loss([v for i, (_, v) in zip(items, leads, strict=True) if i.label is not None], loss)
            decided = [(top, top if v >= margin else None) for top, v in leads]
            print(summary(f"classifier {kind}, l2 {l2:g}, margin {margin:.2f} (CV)", items, decided))
            rejected = float(np.mean([d[1] is None for i, d in zip(items, decided, strict=True) if i.label is None]))
            if best is None or rejected > best[0]:
                best = (rejected, dataclasses.replace(fit(items, kind, l2), margin=margin))
    if args.queries is None or best is None:
        return
    queries = query_items(registry, args.queries)
    print(f"on {args.queries} ({len(queries)} prompts; reporting only)")
    floor_text = f"floor {base.background_floor:.2f}"
    print(summary(f"rule, lead {base.min_lead}, {floor_text}", queries, [rule(base)(q) for q in queries]))
    model = best[1]
    print(
        summary(
            f"classifier {model.kind}, margin {model.margin:.2f} (best CV)", queries, [model.decide(q) for q in queries]
        )
    )


if __name__ == "__main__":
    main()
