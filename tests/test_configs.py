"""Every shipped config (score networks and classifiers) loads, validates and builds its train step;
the 2-D configs train one step for real, and one image config per architecture traces its whole
train step at the config's real shapes (``jax.eval_shape``: nothing is compiled; tracing a
60M-parameter network's backward pass takes 5-30 s on 2 CPU cores, so each architecture is traced
once; tests/test_paper_models.py builds every config's network with ``jax.eval_shape``).
"""

import importlib
import pathlib

import jax
import numpy as np
import pytest

from score_sde import models
from score_sde import train
from score_sde import builders

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every configs/**/*.py with get_config(): score models and classifiers (training.objective).
CONFIGS = sorted(str(p.relative_to(ROOT / "configs").with_suffix("")) for p in (ROOT / "configs").rglob("*.py")
               if not p.name.startswith("default") and "def get_config" in p.read_text())


def load(name):
  return importlib.import_module("configs." + name.replace("/", ".")).get_config()


# One image config per architecture (name: the network it traces).
TRACED = {"vp/digits_unet_continuous": "unet", "vp/cifar10_ddpmpp_continuous": "ncsnpp",
        "ve/cifar10_ncsnpp_continuous": "ncsnpp", "vp/ddpm/cifar10_continuous": "ddpm",
        "ve/ncsnv2/cifar10": "ncsnv2_64", "ve/ncsn/cifar10": "ncsn", "classifier/digits_wrn": "wideresnet",
        "vp/digits_cfg": "unet"}
TOY = [name for name in CONFIGS if name.startswith("toy/")]


def test_the_embedded_configs_are_there():
  assert {"toy/vp_8gaussians", "toy/subvp_mixture", "toy/ve_checkerboard", "vp/digits_unet_continuous"} <= set(CONFIGS)


def build(name):
  config = load(name)
  builders.validate(config)
  t = config.training
  example = builders.example_shape(config)
  sde = builders.build_sde(config)
  model = builders.build_network(config)
  fns = builders.build_step_fns(config, sde, model, example)
  batch_shape = ((t.n_jitted_steps,) if t.n_jitted_steps > 1 else ()) + (t.batch_size,) + example
  return config, model, fns, batch_shape


def network_name(config):
  return config.classifier.name if config.training.objective == "classifier" else config.model.name


def batch_of(config, images):
  """A pipeline batch: the images and class-0 labels over their leading (k, B) or (B,) axes."""
  axes = 2 if config.training.n_jitted_steps > 1 else 1
  return {"image": images, "label": np.zeros(images.shape[:axes], np.int32)}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_builds(name):
  config, model, _, _ = build(name)
  assert config.model.name in models.MODELS and model is not None


@pytest.mark.parametrize("name", TOY)
def test_one_train_step_of_each_toy_config(name):
  config, _, (init_state, train_fn, eval_fn), batch_shape = build(name)
  t = config.training
  key = jax.random.key(0)
  state = jax.jit(init_state)(key)
  batch = batch_of(config, jax.random.uniform(jax.random.key(1), batch_shape))
  new_state, metrics = jax.jit(train_fn)(key, state, batch)
  assert int(new_state.step) == t.n_jitted_steps
  assert np.all(np.isfinite(np.asarray(metrics["loss"])))
  assert np.isfinite(float(jax.jit(eval_fn)(key, new_state, batch)["loss"]))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params, new_state.params)
  assert any(jax.tree.leaves(changed))


@pytest.mark.parametrize("name", sorted(TRACED))
def test_train_step_shapes_of_each_architecture(name):
  config, _, (init_state, train_fn, _), batch_shape = build(name)
  assert network_name(config) == TRACED[name]
  t = config.training
  key = jax.random.key(0)
  state = jax.eval_shape(init_state, key)
  batch = batch_of(config, jax.ShapeDtypeStruct(batch_shape, np.float32))
  new_state, metrics = jax.eval_shape(train_fn, key, state, batch)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state.params) == \
    jax.tree.map(lambda a: (a.shape, a.dtype), state.params)
  assert metrics["loss"].shape == ((t.n_jitted_steps,) if t.n_jitted_steps > 1 else ())
