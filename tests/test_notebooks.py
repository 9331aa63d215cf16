"""The tutorial notebooks run top to bottom, and the repository stores them without outputs.

Each notebook's first code cell is tagged ``parameters`` (the papermill convention): it holds the
sizes a reader may scale. The test replaces the values named in ``SMALL`` with smaller ones and a
workdir under the test's temporary directory, then executes every cell in a fresh Python kernel;
any exception in any cell fails the test. The notebooks' own settings are timed in
experiments/README.md ("Notebooks").
"""

import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"

# Per notebook: the parameters the test shrinks (name -> value as source text).
SMALL = {
    "tour_2d.ipynb": {"N_ITERS": "300", "N_SAMPLES": "256"},
    "import_original.ipynb": {"NUM_SAMPLES": "2"},
    "digits.ipynb": {"N_ITERS": "20", "NUM_STEPS": "20"},
}


def _parameters_cell(nb):
  cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "a notebook needs exactly one code cell tagged 'parameters'"
  return cells[0]


def _shrink(source: str, values: dict[str, str]) -> str:
  for name, value in values.items():
    source, count = re.subn(rf"^{name} = .*$", f"{name} = {value}", source, flags=re.M)
    assert count == 1, f"{name} is not set in the parameters cell"
  return source


def test_every_notebook_is_listed():
  assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{name} holds outputs; clear them before committing"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_runs_top_to_bottom(name, tmp_path):
  if not (NOTEBOOKS / name).exists():
    pytest.fail(f"notebooks/{name} is missing")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  cell = _parameters_cell(nb)
  cell.source = _shrink(cell.source, SMALL[name])
  cell.source = re.sub(r'^WORKDIR = .*$', f'WORKDIR = "{tmp_path / "run"}"', cell.source, flags=re.M)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
