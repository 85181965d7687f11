"""Every ``route-cli`` command: a one-line summary in the command lists, an example in ``--help``."""

from __future__ import annotations

import typer
from cir.cli.main import app
from typer.testing import CliRunner


def _commands():
    """(path, click command) for every group and command under ``route-cli``."""
    root = typer.main.get_command(app)
    ctx_cls = type(root.make_context("route-cli", [], resilient_parsing=True))
    stack = [(["route-cli"], root, ctx_cls(root, info_name="route-cli"))]
    while stack:
        path, cmd, ctx = stack.pop()
        yield path, cmd
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                stack.append((path + [name], sub, ctx_cls(sub, parent=ctx, info_name=name)))


def test_every_command_listed():
    paths = {" ".join(p) for p, _ in _commands()}
    # a sample of each level, so a walk that finds nothing fails
    assert {"route-cli mount", "route-cli compressor train", "route-cli bench decode"} <= paths
    assert len(paths) > 25


def test_summaries_are_one_line():
    """The command lists show a docstring's first paragraph; a wrapped one prints broken."""
    wrapped = [" ".join(p) for p, cmd in _commands()
               if "\n" in (cmd.help or "").strip().split("\n\n")[0]]
    assert wrapped == []


def test_leaf_help_has_an_example():
    runner = CliRunner()
    missing = []
    for path, cmd in _commands():
        if hasattr(cmd, "list_commands"):
            continue
        result = runner.invoke(app, [*path[1:], "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        if "Example: route-cli" not in result.output:
            missing.append(" ".join(path))
    assert missing == []
