"""``route-cli``: thin typer + rich wrappers over the library."""
