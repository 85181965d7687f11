"""``route-cli`` entry point: assembles the command groups, each in its own module."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="route-cli",
    help=(
        "Route text to domain experts by reconstruction error (Compression is Routing).\n\n"
        "Start with `route-cli quickstart`, then `route-cli score FILE`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that print measured figures.", no_args_is_help=True)

# Each module defines ``register(app, bench_app)`` and owns its commands.
_GROUPS = ("data", "compressor", "expert", "router", "analyze")


def _assemble() -> None:
    for name in _GROUPS:
        module = importlib.import_module(f"cir.cli.{name}")
        module.register(app, bench_app)
    app.add_typer(bench_app, name="bench")


_assemble()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
