"""The CLI's building blocks: options with their PREMOE_* twins, parameter types, verbs whose errors are one line."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, get_args, get_type_hints

import click

from ..errors import PreMoeError

F = TypeVar("F", bound=Callable[..., Any])

ENV_PREFIX = "PREMOE_"


def option(*decls: str, help: str, env: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """An option declared once: type, default and help in `kwargs`, and its environment twin.

    The twin is `PREMOE_<FLAG>` (the long flag upper-cased, without the verb: `--budget` is PREMOE_BUDGET for every
    verb); `env` names it where one flag means different things in different verbs (PREMOE_BENCH_ROUNDS).
    """
    flag = next(d for d in decls if d.startswith("--")).split("/")[0]  # "--on/--off": the twin is named for --on
    twin = ENV_PREFIX + (env or flag[2:].replace("-", "_").upper())
    return click.option(*decls, help=help, envvar=twin, show_envvar=True, **kwargs)


# --- values from modules that import torch, read only when a verb that needs them runs or shows its help ------------


class Lazy:
    """`module.name`, or what `load()` returns, fetched on first use; click calls it for a default, help prints it."""

    def __init__(self, module: str, name: str = "", *, load: Callable[[Any], Any] | None = None) -> None:
        self.module, self.name, self.load = module, name, load

    def __call__(self) -> Any:
        module = importlib.import_module(self.module)
        value = getattr(module, self.name) if self.name else module
        return self.load(value) if self.load is not None else value

    def __str__(self) -> str:
        value = self()
        return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


class LazyChoice(click.Choice):
    """A choice whose list is declared elsewhere (e.g. CRITERIA), loaded when a value is checked or help is shown."""

    def __init__(self, choices: Lazy) -> None:
        self._lazy = choices
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._lazy())

    @choices.setter
    def choices(self, value: Sequence[str]) -> None:
        raise AttributeError("a LazyChoice reads its choices from where they are declared")

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "[" + "|".join(self.choices) + "]"


def _units(selection: type) -> tuple[str, ...]:
    return get_args(get_type_hints(selection)["unit"])  # the Literal of `Selection.unit`


CRITERION = LazyChoice(Lazy("premoe_service.profiler.criteria", "CRITERIA"))
POLICY = LazyChoice(Lazy("premoe_service.profiler.selection", "POLICIES"))
UNIT = LazyChoice(Lazy("premoe_service.profiler.selection", "Selection", load=_units))


def selection_default(field: str) -> Lazy:
    """The default of a `Selection` field (what registered tasks get when nothing is said)."""
    return Lazy("premoe_service.profiler.selection", "Selection", load=lambda cls: getattr(cls(), field))


class BudgetType(click.ParamType):
    """A budget read by `Budget.parse`, the one parser: a share of the routed experts' bytes (0.5, 50%) or bytes
    with a unit (512MiB, 8GiB, 2e9B; a bare number above 1 is refused). The value stays text, as
    `ServiceConfig.budget` takes it; `auto` passes where allowed."""

    name = "budget"

    def __init__(self, allow_auto: bool = False) -> None:
        self.allow_auto = allow_auto

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if self.allow_auto and text == "auto":
            return text
        from ..runtime.residency import Budget

        try:
            Budget.parse(text)
        except PreMoeError as exc:
            self.fail(exc.message, param, ctx)
        return text

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "BUDGET"


BUDGET = BudgetType()


class CommaList(click.ParamType):
    """Comma-separated values, each checked by `item` (a tuple comes back; a default may be a tuple already)."""

    def __init__(self, item: click.ParamType | None = None) -> None:
        self.item = item or click.STRING
        self.name = f"{self.item.name}[,...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        parts: Iterable[Any] = value if isinstance(value, tuple | list) else str(value).split(",")
        return tuple(self.item.convert(p.strip() if isinstance(p, str) else p, param, ctx) for p in parts if p != "")

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "A,B,..."


# Quantized expert precisions, read from the store's table of bit widths (`store.quant.BITS`) when a verb runs.
PRECISIONS = CommaList(LazyChoice(Lazy("premoe_service.store.quant", "BITS", load=lambda bits: tuple(bits))))
GROUP_SIZE = Lazy("premoe_service.store.quant", "DEFAULT_GROUP_SIZE")  # weights per scale of quantized experts

PORT = click.IntRange(0, 65535)
PORT.name = "port"  # the metavar help shows
POSITIVE = click.IntRange(min=1)
SHARE = click.FloatRange(0, 1)
SHARE.name = "share"
OPEN_SHARE = click.FloatRange(0, 1, min_open=True)
OPEN_SHARE.name = "share"


# --- verbs -----------------------------------------------------------------------------------------------------------


class VerbError(click.ClickException):
    """A verb's failure on bad input, as one line `premoe VERB: error: ...` (exit 2, like a bad option)."""

    exit_code = 2


class RpcFailure(VerbError):
    """A call the server refused or could not answer, as one line `premoe VERB: CODE: details` (exit 1)."""

    exit_code = 1


def _rpc_error(exc: BaseException) -> bool:
    grpc = sys.modules.get("grpc")  # imported by every client verb; when it is not, no RPC ran
    return grpc is not None and isinstance(exc, grpc.RpcError)


def _rpc_message(exc: BaseException) -> str:
    code: Any = getattr(exc, "code", None)
    details: Any = getattr(exc, "details", None)
    name = getattr(code(), "name", "error") if callable(code) else "error"
    return f"{name}: {details() if callable(details) else exc}"


def translate(ctx: click.Context, exc: Exception) -> click.ClickException | None:
    """The project's errors as click's: a field that names one of the verb's options is reported as that flag."""
    if isinstance(exc, PreMoeError):
        by_name = {p.name: p for p in ctx.command.params}
        param = by_name.get(exc.field or "")
        if param is not None:
            return click.BadParameter(exc.message, ctx=ctx, param=param)
        return VerbError(f"{ctx.command_path}: error: {exc}")
    if _rpc_error(exc):
        return RpcFailure(f"{ctx.command_path}: {_rpc_message(exc)}")
    return None


class Verb(click.Command):
    """A command whose domain and RPC errors become one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            error = translate(ctx, exc)
            if error is None:
                raise
            raise error from exc


class VerbGroup(click.Group):
    """A group of verbs, listed in the order they were declared."""

    command_class = Verb

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as exc:
            error = translate(ctx, exc)
            if error is None:
                raise
            raise error from exc


VerbGroup.group_class = VerbGroup


def verb(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Verb]:
    """Declare a verb (a `Verb`: its errors are one line)."""
    return click.command(name, cls=Verb, **kwargs)


def one_line(exc: click.ClickException) -> str:
    """A usage or verb error on one line, naming the verb and (for a bad option) the flag."""
    message = " ".join(exc.format_message().split())
    if isinstance(exc, VerbError):
        return message
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "premoe"
    return f"{where}: error: {message}"
