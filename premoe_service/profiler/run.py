"""Profiling a task: tokenise its demos, run them layer by layer over the store, and write the profile."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ..experts import ExpertSource
from ..runtime.model import PatternedModel
from .demos import Demo, demo_hash
from .profile import Profile
from .routing_stats import StatsCollector
from .selection import Selection

log = logging.getLogger(__name__)


@dataclass
class ProfileRun:
    """Scores of one profiling pass, with what it cost."""

    scores: dict[str, torch.Tensor]
    token_count: int
    truncated: list[int] = field(default_factory=list)
    peak_slot_bytes: int = 0
    channel_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # criterion -> [L, E, I]


def tokenize_demos(
    tokenizer: Any, demos: Sequence[Demo], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ids and mask [B, S]; demos over `max_length` tokens are cut, and their indices returned."""
    encoded = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in demos]
    truncated = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    for i in truncated:
        log.warning("demo %d has %d tokens; only the first %d count", i, len(encoded[i]), max_length)
    encoded = [ids[:max_length] for ids in encoded]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask, truncated


@torch.no_grad()
def collect_scores(
    patterned: PatternedModel,
    source: ExpertSource,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    streamed: bool,
    tcess_threshold: float = 0.0,
    progress: bool = False,
    channels: bool = True,
) -> ProfileRun:
    """All criteria in one forward pass over the demo batch (with `channels`, the channel scores too).

    With `streamed`, the engine starts with empty MoE layers: each layer's experts are loaded from
    `source` just before the layer runs and dropped right after, so at most one layer of experts is
    resident. Otherwise every MoE layer must already route over all of its experts.
    """
    device = patterned.device
    mask = attention_mask.to(device)
    collector = StatsCollector(patterned, mask.reshape(-1).bool(), tcess_threshold, channels)
    layers = patterned.decoder_layers
    bar = tqdm(total=len(layers), desc="profile", unit="layer", disable=not progress)
    peak = 0
    handles = []

    def before(layer: int) -> Any:
        def hook(*_: Any) -> None:
            nonlocal peak
            if streamed and layer in patterned.slots:
                patterned.fill_layer(layer, source)
                peak = max(peak, patterned.expert_bytes_resident())

        return hook

    def after(layer: int) -> Any:
        def hook(*_: Any) -> None:
            if streamed and layer in patterned.slots:
                patterned.empty_layer(layer)
            bar.update()

        return hook

    for index, decoder_layer in enumerate(layers):
        handles.append(decoder_layer.register_forward_pre_hook(before(index)))
        handles.append(decoder_layer.register_forward_hook(after(index)))
    try:
        with collector.attach():
            patterned.model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    if not streamed:
        peak = patterned.expert_bytes_resident()
    return ProfileRun(
        collector.scores(), collector.tokens, peak_slot_bytes=peak, channel_scores=collector.channel_scores()
    )


def build_profile(
    name: str,
    run: ProfileRun,
    demos: Sequence[Demo],
    *,
    fingerprint: str,
    moe_layers: Sequence[int],
    description: str = "",
    selection: Selection | None = None,
    embedder: Any = None,
    signal: Any = None,
    examples: Sequence[str] = (),
) -> Profile:
    """A profile from a run; demos (then the retrieval-only `examples`) are embedded when an embedder (with `.name`
    and `.encode`) is given, and get their router signal when a `retrieval.RouterSignal` is given."""
    texts = [d.text for d in demos] + list(examples)
    embeddings = None
    if embedder is not None:
        embeddings = torch.from_numpy(embedder.encode(texts)).float()
    router: dict[str, Any] = {} if signal is None else signal.profile_fields(texts)
    return Profile(
        name=name,
        description=description,
        fingerprint=fingerprint,
        moe_layers=tuple(moe_layers),
        scores=run.scores,
        channels=run.channel_scores,
        demo_embeddings=embeddings,
        embedder=getattr(embedder, "name", "") if embedder is not None else "",
        demo_hash=demo_hash(demos),
        token_count=run.token_count,
        selection=(selection or Selection()).to_json(),
        demos=[d.text for d in demos],
        examples=list(examples),
        **router,
    )


def profile_store(
    store: Any,
    name: str,
    demos: Sequence[Demo],
    *,
    description: str = "",
    selection: Selection | None = None,
    embedder: Any = None,
    tcess_threshold: float = 0.0,
    device: str | None = None,
    progress: bool = False,
    patterned: PatternedModel | None = None,
    examples: Sequence[str] = (),
    channels: bool = False,
) -> tuple[Profile, ProfileRun]:
    """Profile a task over a store, layer-streamed: dense part resident, one layer of experts at a time.

    With `channels`, the pass also scores every expert's channels (`premoe profile` does by default; a task
    registered on a server does not: its plans hold whole experts, and the scores cost about two forwards).

    `engine` may be a layer-streaming engine built earlier (`load_model(store, capacity=0)`) to reuse. The
    router signal is read on its own copy of the first layers, sharing the engine's dense tensors.
    """
    from transformers import AutoTokenizer

    from ..names import check_task_name
    from ..runtime.build import load_model
    from ..runtime.router_signal import RouterSignal

    check_task_name(name)
    if patterned is None:
        patterned, _ = load_model(store, device=device, capacity=0)
    tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
    max_length = int(getattr(patterned.config, "max_position_embeddings", 4096))
    ids, mask, truncated = tokenize_demos(tokenizer, demos, max_length)
    run = collect_scores(
        patterned,
        store,
        ids,
        mask,
        streamed=True,
        tcess_threshold=tcess_threshold,
        progress=progress,
        channels=channels,
    )
    run.truncated = truncated
    profile = build_profile(
        name,
        run,
        demos,
        fingerprint=store.fingerprint,
        moe_layers=patterned.spec.moe_layers,
        description=description,
        selection=selection,
        embedder=embedder,
        signal=RouterSignal.from_store(store, device=patterned.device, dense=patterned.dense_state_dict()),
        examples=examples,
    )
    return profile, run
