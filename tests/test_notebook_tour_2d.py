"""notebooks/tour_2d.ipynb runs top to bottom (with small settings) and is stored without outputs."""

import pytest

from tests import notebooks

pytestmark = pytest.mark.slow  # left out by the fast command (README, "Tests")

NAME = "tour_2d.ipynb"


def test_stored_without_outputs():
  notebooks.check_stored_without_outputs(NAME)


def test_runs_top_to_bottom(tmp_path, monkeypatch):
  # Full optimisation: its small networks run many steps, so unoptimised code costs more than it saves.
  notebooks.run(NAME, {"N_ITERS": "300", "N_SAMPLES": "256", "N_HELD_OUT": "200"}, tmp_path, monkeypatch,
                fast_compile=False)


def test_every_notebook_has_a_test():
  notebooks.check_every_notebook_has_a_test()
