"""Human views of a profile: a text summary and a PNG heatmap of scores (layers x experts)."""

from __future__ import annotations

from pathlib import Path

import torch

from .profile import Profile


def summary(profile: Profile, top: int = 5) -> str:
    """A few lines: provenance, then per criterion the most important experts of each layer."""
    lines = [
        f"task {profile.name}: {profile.description or '(no description)'}",
        f"  model fingerprint {profile.fingerprint}, {profile.token_count} demo tokens from {len(profile.demos)} demos",
        f"  embedder {profile.embedder or '(none)'}; created {profile.created}; selection {profile.selection or '{}'}",
    ]
    for criterion, matrix in sorted(profile.scores.items()):
        lines.append(f"  {criterion}:")
        for row, layer in enumerate(profile.moe_layers):
            scores = matrix[row]
            total = float(scores.sum()) or 1.0
            best = torch.argsort(scores, descending=True, stable=True)[:top].tolist()
            share = sum(float(scores[e]) for e in best) / total
            listed = ", ".join(f"{e}:{float(scores[e]) / total:.2f}" for e in best)
            lines.append(f"    layer {layer:>3}: top {len(best)} hold {share:5.1%}  [{listed}]")
    return "\n".join(lines)


def heatmap(profile: Profile, out: str | Path, criteria: list[str] | None = None) -> Path:
    """Write a PNG with one panel per criterion; each row (layer) normalised to its own maximum."""
    from ..plotting import pyplot

    plt = pyplot()

    names = criteria or sorted(profile.scores)
    fig, axes = plt.subplots(
        len(names), 1, figsize=(10, 1.2 + 0.35 * len(profile.moe_layers) * len(names)), squeeze=False
    )
    for ax, name in zip(axes[:, 0], names, strict=True):
        matrix = profile.scores[name].float()
        matrix = matrix / matrix.amax(dim=1, keepdim=True).clamp_min(1e-30)
        image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{profile.name}: {name} (each layer scaled to its maximum)", fontsize=9)
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(profile.moe_layers)), [str(layer) for layer in profile.moe_layers], fontsize=7)
        ax.set_xlabel("expert")
        fig.colorbar(image, ax=ax, fraction=0.02)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
