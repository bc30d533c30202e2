"""The `premoe` command line, declared with click: each verb parses its options (each with a PREMOE_* twin) and calls
one function. Importing it imports no torch: the verbs import what they need when they run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from .bench import bench
from .model import evaluate, export, shard
from .params import VerbGroup, one_line, option
from .profiling import pattern, profile
from .ray import bench_ray, serve_ray
from .remote import generate, health, load, register, route, stats, tasks, unload
from .serve import serve

__all__ = ["cli", "main"]


@click.group(
    "premoe",
    cls=VerbGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 120},
    epilog="Every option has an environment twin PREMOE_<OPTION>, shown in its help; `premoe VERB --help` explains "
    "a verb.",
)
@option("-v", "--verbose", is_flag=True, help="log debug messages")
def cli(verbose: bool) -> None:
    """Serve Mixture-of-Experts models with only a task's experts resident."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


for verb in (shard, profile, serve, route, generate, register, tasks, load, unload, stats, pattern, export, evaluate):
    cli.add_command(verb)
for verb in (bench, health):
    cli.add_command(verb)
cli.add_command(serve_ray)  # Ray is imported only when it runs
bench.add_command(bench_ray)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `premoe ARGV`; returns the exit status: 0, 1 (an RPC failed, health not SERVING), 2 (a bad option or
    input, as one line naming it), 130 (interrupted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(cli.main(args=args, prog_name="premoe", standalone_mode=False) or 0)
    except click.ClickException as exc:
        click.echo(one_line(exc), err=True)
        return exc.exit_code
    except click.Abort:
        return 130
