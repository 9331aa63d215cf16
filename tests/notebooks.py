"""Runs a tutorial notebook of ``notebooks/`` top to bottom with small settings (see the test_notebook_* files).

Each notebook's first code cell is tagged ``parameters`` (the papermill convention): it holds the
sizes a reader may scale. ``run`` replaces the values it is given with smaller ones and the workdir
with one under the test's temporary directory, then executes every cell in a fresh Python kernel;
an exception in any cell fails the test. With ``fast_compile`` the kernel compiles with XLA's backend
optimisations off, for notebooks whose short runs are dominated by compiling large networks (the
numbers the notebook prints are not checked). Each
notebook has its own test file so that parallel test workers can take them at the same time. The
notebooks' own settings are timed in experiments/README.md ("Notebooks").
"""

import pathlib
import re

import pytest

from tests import helpers

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def _parameters_cell(nb):
  cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "a notebook needs exactly one code cell tagged 'parameters'"
  return cells[0]


def check_stored_without_outputs(name: str) -> None:
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{name} holds outputs; clear them before committing"


def run(name: str, small: dict[str, str], tmp_path: pathlib.Path, monkeypatch, fast_compile: bool = True) -> None:
  """Executes notebooks/``name`` with the parameters ``small`` (name -> value as source text)."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  cell = _parameters_cell(nb)
  for key, value in {**small, "WORKDIR": repr(str(tmp_path / "run"))}.items():
    cell.source, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", cell.source, flags=re.M)
    assert count == 1, f"{key} is not set in the parameters cell of {name}"
  if fast_compile:
    monkeypatch.setenv("XLA_FLAGS", helpers.FAST_COMPILE_FLAGS)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()


def check_every_notebook_has_a_test() -> None:
  tested = {p.name.removeprefix("test_notebook_").removesuffix(".py") + ".ipynb"
            for p in pathlib.Path(__file__).parent.glob("test_notebook_*.py")}
  assert tested == {p.name for p in NOTEBOOKS.glob("*.ipynb")}
