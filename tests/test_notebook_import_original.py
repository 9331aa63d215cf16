"""notebooks/import_original.ipynb runs top to bottom (with small settings) and is stored without outputs."""

import pytest

from tests import notebooks

pytestmark = pytest.mark.slow  # left out by the fast command (README, "Tests")

NAME = "import_original.ipynb"


def test_stored_without_outputs():
  notebooks.check_stored_without_outputs(NAME)


def test_runs_top_to_bottom(tmp_path, monkeypatch):
  notebooks.run(NAME, {"NUM_SAMPLES": "2"}, tmp_path, monkeypatch)
