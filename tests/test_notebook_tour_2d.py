"""notebooks/tour_2d.ipynb runs top to bottom (with small settings) and is stored without outputs."""

from tests import notebooks

NAME = "tour_2d.ipynb"


def test_stored_without_outputs():
  notebooks.check_stored_without_outputs(NAME)


def test_runs_top_to_bottom(tmp_path, monkeypatch, fast_compile=False):
  notebooks.run(NAME, {"N_ITERS": "300", "N_SAMPLES": "256"}, tmp_path, monkeypatch, fast_compile=False)


def test_every_notebook_has_a_test():
  notebooks.check_every_notebook_has_a_test()
