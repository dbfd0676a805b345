"""The Colab notebooks: each runs from top to bottom in its short mode, and the committed copies carry outputs.

The executed copies go to a temporary folder, so the committed outputs (from a full run) stay as they are. The
notebooks run in the order below and share one workdir, so the later ones reuse the tiny run the quickstart
trains (each one also trains it when run on its own).
"""

import json
import os

import pytest

from tests import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("quickstart.ipynb", "attentive_masking.ipynb", "open_clip_import.ipynb", "evaluate.ipynb")
NEEDS_TORCH = ("open_clip_import.ipynb",)


def _load(name):
  with open(os.path.join(NOTEBOOK_DIR, name)) as f:
    return json.load(f)


def test_every_notebook_is_listed():
  assert sorted(n for n in os.listdir(NOTEBOOK_DIR) if n.endswith(".ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_badge_install_cell_and_outputs(name):
  cells = _load(name)["cells"]
  assert "colab.research.google.com/assets/colab-badge.svg" in "".join(cells[0]["source"])
  code = [c for c in cells if c["cell_type"] == "code"]
  assert "REPO_URL" in "".join(code[0]["source"]) and "pip" in "".join(code[0]["source"])
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert not [o for o in outputs if o["output_type"] == "error"], f"{name} was saved with an error"
  assert all(c.get("execution_count") for c in code), f"{name}: a code cell was not executed"
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} has no saved picture"
  runtime = "".join(t for o in outputs for t in o.get("text", []))
  assert "Runtime: " in runtime and "smoke mode" not in runtime, f"{name}: outputs must come from a full run"


@pytest.fixture(scope="module")
def shared_workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("notebook_runs")


@pytest.mark.slow(reason="executes a notebook in a Jupyter kernel")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_short_mode(name, shared_workdir, tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient", reason="needs nbclient (pip install 'sycoca_jax[notebooks]')")
  nbformat = pytest.importorskip("nbformat", reason="needs nbformat (pip install 'sycoca_jax[notebooks]')")
  if name in NEEDS_TORCH:
    pytest.importorskip("torch", reason="needs torch (pip install 'sycoca_jax[torch]')")
    pytest.importorskip("open_clip", reason="needs open-clip-torch (pip install 'sycoca_jax[torch]')")
  monkeypatch.setenv("SYCOCA_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("SYCOCA_NOTEBOOK_WORKDIR", str(shared_workdir))
  monkeypatch.setenv("XLA_FLAGS", distributed.xla_flags(1))  # one CPU device, as on a fresh runtime
  notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  try:
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
  finally:
    nbformat.write(notebook, str(tmp_path / name))  # the executed copy; the committed one is untouched
