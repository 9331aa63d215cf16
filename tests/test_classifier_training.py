"""Noise-conditional classifier training through the training loop, and classifier guidance from a config.

One short run of a small MLP classifier (``configs/classifier/toy_8gaussians_mlp.py`` made smaller)
of the eight-Gaussians component under the VP SDE: it must log loss and accuracy, restore its EMA
weights, classify clean points far above chance, and guide ``--mode sample`` of a score model from
its workdir (``sampling.guidance="classifier"``). The digits Wide ResNet config's train step is
traced in tests/test_configs.py (compiling a convolutional classifier costs tens of seconds here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.classifier import toy_8gaussians_mlp
from configs.toy import vp_8gaussians
from score_sde import builders
from score_sde import checkpoints
from score_sde import datasets
from score_sde import evaluate
from score_sde import losses
from score_sde import models
from score_sde import train
from score_sde.models import wrapper
from tests.test_train import read_scalars

N_ITERS = 60


def classifier_config():
  config = toy_8gaussians_mlp.get_config()
  config.seed = 0
  config.classifier.update(hidden_dims=(32, 32), embedding_size=8)
  t = config.training
  t.batch_size, t.n_iters, t.n_jitted_steps = 128, N_ITERS, 10
  t.log_freq, t.eval_freq, t.snapshot_freq, t.snapshot_freq_for_preemption = 20, 30, 60, 30
  config.data.num_train = 2048
  config.model.ema_rate = 0.8
  config.optim.lr, config.optim.warmup = 3e-3, 5
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = classifier_config()
  return config, train.train(config, tmp_path_factory.mktemp("classifier"))


@pytest.mark.slow
def test_classifier_run_logs_loss_and_accuracy_and_learns(run):
  _, result = run
  assert result.step == N_ITERS
  scalars = read_scalars(result.tensorboard_dir)
  assert set(scalars) == {"training_loss", "grad_norm", "lr", "eval_loss", "eval_accuracy"}
  assert [s for s, _ in scalars["eval_accuracy"]] == [30, 60]
  assert all(0.0 <= v <= 1.0 for _, v in scalars["eval_accuracy"])
  # The mean cross-entropy of steps 41-60 is below that of steps 1-20 (log 8 = 2.08 at chance).
  losses = [v for _, v in result.history["training_loss"]]
  assert losses[-1] < losses[0]


def test_restored_classifier_is_the_ema_and_classifies_clean_points(run):
  config, result = run
  restored = builders.restore(config, result.workdir)
  logit_fn = restored.fn
  assert restored.step == N_ITERS and restored.network.num_classes == 8
  for a, b in zip(jax.tree.leaves(logit_fn.variables["params"]), jax.tree.leaves(result.state.ema_params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Accuracy on 1000 held-out points at the noise-free end (t = 1e-3). The components are 5.4 std
  # apart (Bayes accuracy 0.99); chance is 1/8 with a standard deviation of 0.01 here.
  source = datasets.toy_source("8gaussians", "test")
  logits = jax.jit(lambda f, x, t: f(x, t))(logit_fn, jnp.asarray(source.images), jnp.full((len(source),), 1e-3))
  accuracy = float(np.mean(np.argmax(logits, axis=1) == source.labels))
  assert accuracy > 0.5, accuracy
  # A classifier run is not a score model.
  with pytest.raises(ValueError, match="classifier_workdir"):
    builders.restore_score_model(config, result.workdir)


@pytest.mark.slow  # main.py's --mode sample path
def test_mode_sample_with_classifier_guidance(run, tmp_path):
  """A score model's ``--mode sample`` path guided by the classifier's workdir writes labelled samples."""
  _, result = run
  config = vp_8gaussians.get_config()
  config.model.hidden_dims = (16, 16)
  config.sampling.update(batch_size=16, num_steps=4, guidance="classifier", guidance_scale=1.0,
                         classifier_workdir=result.workdir, class_labels=(5,))
  config.eval.num_samples = 16
  # The score model's workdir: an untrained network's checkpoint (sampling reads its EMA weights).
  params = wrapper.init_model(jax.random.key(0), models.get_model(config), (1, 2))["params"]
  ckpt = checkpoints.Checkpointer(tmp_path, snapshot_freq=1, preemption_freq=1)
  ckpt.save(1, losses.init_train_state(params, builders.build_optimizer(config)), {}, force=True)
  ckpt.close()
  sampled = evaluate.sample(config, tmp_path, tmp_path / "eval")
  assert sampled["samples"].shape == (16, 2) and sampled["non_finite"] == 0
  np.testing.assert_array_equal(sampled["labels"], np.full(16, 5))
  np.testing.assert_array_equal(np.load(sampled["npz"])["labels"], np.full(16, 5))
  # The classifier was trained on VP noise: guiding a VE score model is refused, naming the keys.
  config.training.sde = "vesde"
  with pytest.raises(ValueError, match="training.sde"):
    builders.build_guided_score_fns(config, builders.Restored(sde=builders.build_sde(config),
                                                              network=models.get_model(config), fn=None, step=0))
