"""Likelihoods as the papers report them, from a config: estimators x dequantisers, a trained variational
dequantiser, one table per checkpoint.

A tiny digits score model (an MLP on the flattened 8x8 images, 4 steps) stands in for a trained one: the
numbers are not checked against truth here (tests/test_bound.py and tests/test_dequantization.py do that on
closed forms), only that every configured row is computed on every example, the default row is exactly
the number the framework reported before the table existed, a dequantiser run trains and resumes like
every run, and its flow enters the table.
"""

import json

import jax
import numpy as np
import pytest

from configs.dequantizer import digits_flow
from configs.vp import digits_unet_continuous
from score_sde import builders
from score_sde import evaluate
from score_sde import likelihood as likelihood_lib
from score_sde import train


def tiny(config):
  t = config.training
  t.n_iters, t.n_jitted_steps, t.batch_size = 4, 1, 16
  t.log_freq = t.eval_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = 2
  t.snapshot_sampling = t.final_evaluation = False
  config.model.name, config.model.hidden_dims = "mlp", (32,)
  e = config.eval
  e.batch_size, e.rtol, e.atol, e.likelihood_examples = 64, 1e-2, 1e-2, 100
  return config


@pytest.fixture(scope="module")
def score_run(tmp_path_factory):
  config = tiny(digits_unet_continuous.get_config())
  workdir = tmp_path_factory.mktemp("score")
  train.train(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_every_estimator_and_dequantizer_on_every_example(score_run, tmp_path):
  config, workdir = score_run
  default = evaluate.likelihood(config, workdir, tmp_path / "default")
  config = config.copy_and_resolve_references()
  config.eval.update(likelihood_estimators=("ode", "bound"), dequantizers=("uniform", "truncated_normal"),
                     bound_time_samples=3)
  builders.validate(config)
  result = evaluate.likelihood(config, workdir, tmp_path / "table")
  assert [(r["estimator"], r["dequantizer"]) for r in result["rows"]] == [
      ("ode", "uniform"), ("ode", "truncated_normal"), ("bound", "uniform"), ("bound", "truncated_normal")]
  for row in result["rows"]:
    assert np.isfinite(row["mean"]) and row["sem"] > 0 and row["examples_per_second"] > 0
  assert result["rows"][2]["nfe"] == 3                         # time samples per example
  with np.load(result["npz"]) as data:
    for name in ("ode_uniform", "ode_truncated_normal", "bound_uniform", "bound_truncated_normal"):
      assert data[f"values_{name}"].shape == (100,)
    assert json.loads(str(data["settings"]))["eval"]["bound_time_samples"] == 3
  # The default row is the number the framework always reported: the same noise, the same probes.
  np.testing.assert_array_equal(result["row_values"]["ode_uniform"], default["values"])
  # Rows share the examples and the noise: each difference is paired with its estimator's first dequantiser.
  difference = result["row_values"]["bound_truncated_normal"] - result["row_values"]["bound_uniform"]
  assert result["rows"][3]["difference"] == pytest.approx(float(np.mean(difference.astype(np.float64))), rel=1e-6)
  assert result["rows"][2]["difference"] == 0.0
  # The same command again reads the table back.
  kept = evaluate.likelihood(config, workdir, tmp_path / "table")
  assert kept["kept"] and kept["rows"] == json.loads(json.dumps(result["rows"]))


@pytest.mark.slow
def test_a_variational_dequantizer_trains_resumes_and_enters_the_table(score_run, tmp_path):
  score_config, score_workdir = score_run
  config = digits_flow.get_config()
  config.dequantizer.update(score_workdir=str(score_workdir), features=8, num_steps=1)
  t = config.training
  t.n_iters, t.batch_size = 4, 16
  t.log_freq = t.eval_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = 2
  config.model.name, config.model.hidden_dims = "mlp", (32,)   # the score model's network
  first = train.train(config, tmp_path / "deq")
  assert first.step == 4 and np.isfinite(first.training_loss) and np.isfinite(first.last("eval_bpd"))
  saved = json.loads((tmp_path / "deq" / builders.SCORE_CONFIG).read_text())
  assert saved["model"]["name"] == "mlp"
  # The frozen score model rides in the state unchanged; only the flow moved.
  restored_score = builders.restore(score_config, score_workdir)
  for a, b in zip(jax.tree.leaves(first.state.params["score"]), jax.tree.leaves(restored_score.fn.variables["params"]),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Resumes like every run.
  config.training.n_iters = 6
  resumed = train.train(config, tmp_path / "deq")
  assert resumed.step == 6 and [s for s, _ in resumed.history["training_loss"]] == [6]
  # Its flow is a dequantiser of the score model's likelihood table.
  evaluation = score_config.copy_and_resolve_references()
  evaluation.eval.update(dequantizers=("uniform", "variational"), dequantizer_workdir=str(tmp_path / "deq"),
                         likelihood_examples=32)
  builders.validate(evaluation)
  result = evaluate.likelihood(evaluation, score_workdir, tmp_path / "eval")
  assert [r["dequantizer"] for r in result["rows"]] == ["uniform", "variational"]
  assert all(np.isfinite(r["mean"]) for r in result["rows"])
  deq = builders.build_dequantizer(evaluation, restored_score.sde, "variational")
  u, log_q = deq(jax.random.key(0), np.zeros((3, 8, 8, 1), np.int32))
  assert u.shape == (3, 8, 8, 1) and float(u.min()) >= 0 and float(u.max()) < 1 and log_q.shape == (3,)


def test_a_dequantizer_without_its_score_model_is_refused_before_the_workdir_is_touched(tmp_path):
  config = digits_flow.get_config()
  config.dequantizer.score_workdir = str(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="score_workdir=.*absent.*holds no config.json"):
    train.train(config, tmp_path / "deq")
  assert not (tmp_path / "deq").exists()
  config.dequantizer.score_workdir = ""
  with pytest.raises(ValueError, match="config.dequantizer.score_workdir is empty"):
    builders.validate(config)


@pytest.mark.slow
def test_uniform_dequantization_matches_the_likelihood_module(score_run):
  """The table's (ode, uniform) row is ``likelihood.get_bpd_fn`` itself: one bits/dim, two routes."""
  config, workdir = score_run
  restored = builders.restore(config, workdir)
  images = np.asarray(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1)), np.float32) / 255.0
  fn = builders.build_likelihood_fn(config, restored.sde, True, "ode")
  key = jax.random.key(3)
  bpd, _ = fn(key, restored.fn, images, builders.build_dequantizer(config, restored.sde, "uniform"))
  e = config.eval
  reference = likelihood_lib.get_bpd_fn(restored.sde, lambda u: 2 * u - 1, divergence=e.divergence, rtol=e.rtol,
                                        atol=e.atol, eps=e.eps)(key, restored.fn, np.round(images * 255).astype(np.uint8))
  np.testing.assert_allclose(bpd, reference[0], rtol=1e-5)
