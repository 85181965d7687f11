"""A plain (non-editable) ``pip install .`` gives a working package and console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_non_editable_install(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import cir, cir.data, cir.compressor, cir.experts, cir.router, cir.cli.main; print(cir.__file__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert Path(out.stdout.strip()).is_relative_to(target)
    cli = subprocess.run([str(target / "bin" / "route-cli"), "--help"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "bench" in cli.stdout
