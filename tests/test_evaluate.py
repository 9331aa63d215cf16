"""Evaluation over checkpoints: loss, bits/dim repeats, samples with FID/KID/IS, resumption.

A tiny digits run (an MLP on the flattened 8x8 images, 4 steps, checkpoints at steps 2 and 4) is
evaluated with a synthetic Inception network (random weights written in pytorch-fid's layout) at
75x75 pixels, which keeps the test in seconds; the metric formulas themselves are tested against
independent references in tests/test_metrics.py.
"""

import json

import numpy as np
import pytest

from configs.vp import digits_unet_continuous
from score_sde import evaluate
from score_sde import sample_quality
from score_sde import train
from score_sde import builders
from score_sde.models import inception

pytestmark = pytest.mark.slow  # a training run, reference statistics and an evaluation per test: --mode eval


def synthetic_inception(path):
  rng = np.random.default_rng(0)
  arrays = {}
  for name, shape in inception.torch_shapes().items():
    if name.endswith("running_var"):
      arrays[name] = np.ones(shape, np.float32)
    elif name.endswith(("running_mean", "bias")):
      arrays[name] = np.zeros(shape, np.float32)
    elif name.endswith("bn.weight"):
      arrays[name] = np.ones(shape, np.float32)
    else:
      fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
      arrays[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_run")
  config = digits_unet_continuous.get_config()
  t = config.training
  t.n_iters, t.n_jitted_steps, t.batch_size = 4, 1, 16
  t.log_freq, t.eval_freq, t.snapshot_freq, t.snapshot_freq_for_preemption = 2, 2, 2, 2
  t.snapshot_sampling = False
  config.model.name, config.model.hidden_dims = "mlp", (32,)
  config.sampling.num_steps, config.sampling.batch_size = 4, 10
  e = config.eval
  e.batch_size, e.rtol, e.atol, e.likelihood_examples = 64, 1e-2, 1e-2, 64
  e.enable_bpd, e.bpd_repeats = True, 2
  e.enable_sampling, e.num_samples = True, 25            # 3 rounds of 10, the last one partly used
  e.feature_network, e.inception_path = "inception", synthetic_inception(root / "inception.npz")
  e.inception_size, e.kid_subsets, e.kid_subset_size = 75, 5, 10
  e.fid_stats_path = str(root / "digits_stats.npz")
  builders.validate(config)
  train.train(config, root / "workdir")
  stats = sample_quality.fid_stats(config, e.fid_stats_path, split="test")
  return config, root, stats


def test_reference_statistics_count_every_example(run):
  config, _, stats = run
  assert stats["num_examples"] == 297                      # the whole digits test split, 64 per batch
  assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
  with np.load(config.eval.fid_stats_path) as data:
    assert data["features"].shape == (297, 2048)


def test_every_checkpoint_is_evaluated_and_summarised(run):
  config, root, _ = run
  result = evaluate.evaluate(config, root / "workdir", root / "eval")
  assert [row["step"] for row in result["rows"]] == [2, 4]
  for row in result["rows"]:
    for key in ("eval_loss", "bpd", "fid", "kid", "is"):
      assert np.isfinite(row[key]), (key, row)
    assert row["is"] >= 1.0 - 1e-6 and row["fid"] >= -1e-6
  csv = (root / "eval" / "summary.csv").read_text().splitlines()
  assert len(csv) == 3 and csv[0].startswith("ckpt,step")
  with np.load(root / "eval" / "ckpt_1" / "likelihood_1.npz") as data:
    assert data["values"].shape == (64,)
  # Two bits/dim passes with different dequantisation noise.
  with np.load(root / "eval" / "ckpt_1" / "likelihood_0.npz") as a, \
       np.load(root / "eval" / "ckpt_1" / "likelihood_1.npz") as b:
    assert not np.array_equal(a["values"], b["values"])


def test_an_interrupted_evaluation_resumes_without_recomputing(run, monkeypatch):
  config, root, _ = run
  reference = json.loads((root / "eval" / "ckpt_2.json").read_text())[0] if (root / "eval" / "ckpt_2.json").exists() \
      else evaluate.evaluate(config, root / "workdir", root / "eval")["rows"][1]
  out = root / "eval_killed"
  real = sample_quality.get_feature_fn(config, sample_quality.parallel.make_mesh())
  calls = []

  def dies_in_round_two(images):
    calls.append(1)
    if len(calls) == 5:                                     # checkpoint 2, second round
      raise KeyboardInterrupt("killed")
    return real(images)

  monkeypatch.setattr(sample_quality, "get_feature_fn", lambda config, mesh: dies_in_round_two)
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate(config, root / "workdir", out)
  assert (out / "ckpt_1.json").exists() and not (out / "ckpt_2.json").exists()
  first_round = out / "ckpt_2" / f"samples_{builders.sampler_tag(config)}" / "round_0_host_0.npz"
  mtime = first_round.stat().st_mtime_ns
  calls.clear()
  monkeypatch.setattr(sample_quality, "get_feature_fn", lambda config, mesh: lambda images: (calls.append(1),
                                                                                              real(images))[1])
  rows = evaluate.evaluate(config, root / "workdir", out)["rows"]
  assert len(calls) == 2                                    # only rounds 1 and 2 of checkpoint 2 ran again
  assert first_round.stat().st_mtime_ns == mtime
  for key in ("eval_loss", "bpd", "fid", "kid", "is"):
    assert rows[1][key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


def test_a_sampler_sweep_gives_one_row_per_checkpoint_and_sampler(run):
  """``eval.samplers``: each setting's samples, NFE, rate and quality in the digits classifier's feature space."""
  config, root, _ = run
  config = config.copy_and_resolve_references()
  config.eval.update(samplers=("pc", "euler:nfe=3", "unipc:nfe=4,order=2,noise_removal=False"),
                     feature_network="digits", enable_loss=False, enable_bpd=False, end_ckpt=1)
  builders.validate(config)
  rows = evaluate.evaluate(config, root / "workdir", root / "eval_sweep")["rows"]
  assert [(row["step"], row["sampler"], row["nfe"]) for row in rows] == [
      (2, "pc-euler_maruyama-none-4", 4), (2, "euler-nfe3", 3), (2, "unipc-nfe4-order2-nodenoise", 4)]
  for row in rows:
    assert row["fd_digits"] > 0 and np.isfinite(row["kid_digits"]) and row["samples_per_second"] > 0
  csv = (root / "eval_sweep" / "summary.csv").read_text().splitlines()
  assert len(csv) == 4 and csv[0].startswith("ckpt,step,sampler")
  # Resumed: every row is read back, nothing is sampled again.
  assert evaluate.evaluate(config, root / "workdir", root / "eval_sweep")["rows"] == rows
