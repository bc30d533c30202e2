"""The benchmarks' figures: bytes moved against the budget for each policy (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def bytes_vs_budget(
    path: str | Path,
    title: str,
    budgets: list[float],
    bytes_moved: dict[str, list[float]],
    unit: str,
    right: tuple[str, dict[str, list[float]]] | None = None,
) -> None:
    """Write a PNG: bytes moved per policy against the budget (share of all routed experts' bytes), and on an
    optional right panel another per-policy series, e.g. (axis label, series)."""
    from ..plotting import pyplot

    plt = pyplot()

    panels = 2 if right is not None else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    percent = [b * 100 for b in budgets]
    colours = {"full reload": "C0", "delta (LRU)": "C1", "delta + shared-use": "C2", "oracle (Belady)": "C3"}
    markers = {"full reload": "s", "delta (LRU)": "o", "delta + shared-use": "^", "oracle (Belady)": "v"}
    left = axes[0][0]
    for name, values in bytes_moved.items():
        left.plot(percent, values, marker=markers.get(name, "o"), color=colours.get(name), label=name)
    left.set_xlabel("budget (% of all routed experts' bytes)")
    left.set_ylabel(f"bytes moved ({unit})")
    left.set_yscale("log")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    if right is not None:
        label, series = right
        axis = axes[0][1]
        for name, values in series.items():
            policy, _, suffix = name.rpartition(" ")  # "delta (LRU) p99": one colour per policy, p99 dashed
            axis.plot(
                percent,
                values,
                marker=markers.get(policy, "o"),
                color=colours.get(policy),
                linestyle="--" if suffix == "p99" else "-",
                label=name,
            )
        axis.set_xlabel("budget (% of all routed experts' bytes)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
