"""The analysis notebooks run top to bottom on debug models (nbclient, kernel python3)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 120


def _kernel_available() -> str | None:
    try:
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError as exc:
        return f"nbclient/nbformat not installed ({exc})"
    if "python3" not in KernelSpecManager().find_kernel_specs():
        return "no Jupyter kernel named python3 (pip install ipykernel)"
    return None


def test_notebooks_exist_and_are_stripped():
    import json

    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_tra_table.ipynb", "02_latent_space.ipynb",
                     "03_routing_vs_gating.ipynb"]
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    reason = _kernel_available()
    if reason:
        pytest.skip(reason)
    import nbformat
    from nbclient import NotebookClient

    for var in ("CKPT", "REGISTRY", "DATA", "IN_DOMAIN", "SEMI_OOD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NB_WORK", str(tmp_path))
    monkeypatch.setenv("METHODS", "pca,tsne")  # UMAP's numba compile is covered elsewhere
    monkeypatch.setenv("STEPS", "15")
    monkeypatch.setenv("MAX_CHUNKS", "40")
    monkeypatch.setenv("MAX_TRAIN", "40")
    monkeypatch.setenv("MAX_TEST", "20")
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert outputs, "the notebook produced no output"
