"""What the benchmarks share: options from flags, a model big enough to time, the machine, percentiles, medians,
targets, interleaved timing, table cells and the bytes-moved plot."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..cores import default_engine_threads, usable_cores

T = TypeVar("T")


def parse_options(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """`cls` built from `--field-name VALUE` flags; booleans are switches, unset fields keep their defaults."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        default: Any = field.default
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default, metavar=field.name.upper())
    return cls(**vars(parser.parse_args(argv)))


# --- a model big enough to time ---------------------------------------------------------------------------------


def bench_model_dir(out: Path, hidden: int, experts: int, layers: int) -> Path:
    """A Qwen3-MoE checkpoint with experts big enough for throughput figures (random weights)."""
    bench_model(hidden, layers, experts).save_pretrained(out)
    return out


def bench_model(hidden: int, layers: int, experts: int, vocab: int = 512) -> Any:
    """A random Qwen3-MoE whose experts are `hidden` x `hidden` SwiGLU blocks (top-2, normalised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden,
        moe_intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    return AutoModelForCausalLM.from_config(config).eval()


# --- figures ----------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "engine_threads": default_engine_threads(),
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpus(m: dict[str, Any]) -> str:
    """`machine()`'s CPUs in words: "2 CPUs", or "64 CPUs, 2 usable" under an affinity mask or a CPU quota."""
    usable = m.get("usable_cores", m["cpu_count"])
    return f"{m['cpu_count']} CPUs" + (f", {usable} usable" if usable != m["cpu_count"] else "")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99)) -> list[float | None]:
    """The qs-th percentiles (0..100) of `values`, linear between closest ranks; None for each when there are none."""
    return [percentile(values, q) for q in qs] if values else [None for _ in qs]


def median(values: Iterable[Any]) -> float | None:
    """The median of the values that are not None, or None when there are none."""
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def target(value: float | None, bound: float, *, above: bool = True, strict: bool = False) -> dict[str, Any]:
    """A target of a report: `value` against `bound` (at least it when `above`, else at most it, or below it when
    `strict`); `met` is None when there is no value to judge."""
    if value is None:
        met = None
    elif above:
        met = value >= bound
    else:
        met = value < bound if strict else value <= bound
    return {"value": value, "bound": bound, "met": met}


def pct(value: float | None) -> str:
    """A share as a table cell: `12.5%`, or `-` when unknown."""
    return "-" if value is None else f"{value:.1%}"


def ms(value: float | None) -> str:
    """Milliseconds as a table cell with three decimals, or `-` when unknown."""
    return "-" if value is None else f"{value:.3f}"


def interleaved(ours: Callable[[], None], raw: Callable[[], None], rounds: int) -> tuple[float, float]:
    """Median seconds of `ours` and of `raw` over `rounds` rounds, alternated so that both see the same machine."""
    ours_s: list[float] = []
    raw_s: list[float] = []
    for _ in range(rounds):
        for fn, times in ((ours, ours_s), (raw, raw_s)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ours_s), statistics.median(raw_s)


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
