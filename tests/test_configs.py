"""Every shipped config (score networks and classifiers) loads, validates and builds its train step;
the 2-D configs train one step for real, and one image config per architecture traces its whole
train step at the config's real shapes (``jax.eval_shape``: nothing is compiled; tracing a
60M-parameter network's backward pass takes 5-30 s on 2 CPU cores, so each architecture is traced
once; tests/test_paper_models.py builds every config's network with ``jax.eval_shape``).

Every config also resolves to exactly what its golden file ``tests/golden_configs/<config>.json`` records: each
dotted key's value, the Python type where JSON does not keep it (tuples), and the keys that share a field
reference. A config that changes on purpose gets its golden file rewritten by
``UPDATE_GOLDEN=1 python -m pytest tests/test_configs.py -k golden`` (review the diff before committing;
golden files of configs that no longer exist are removed).
"""

import dataclasses
import importlib
import json
import os
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from score_sde import models
from score_sde.models import classifier as classifier_lib
from score_sde.models import dequantizer as dequantizer_lib
from score_sde import builders

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every configs/**/*.py with get_config(): score models and classifiers (training.objective).
CONFIGS = sorted(str(p.relative_to(ROOT / "configs").with_suffix("")) for p in (ROOT / "configs").rglob("*.py")
               if not p.name.startswith("default") and "def get_config" in p.read_text())


GOLDEN = ROOT / "tests" / "golden_configs"
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"


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
  return {"classifier": config.classifier.name, "dequantizer": "dequantizer"}.get(config.training.objective,
                                                                                  config.model.name)


def batch_of(config, images):
  """A pipeline batch: the images and class-0 labels over their leading (k, B) or (B,) axes."""
  axes = 2 if config.training.n_jitted_steps > 1 else 1
  return {"image": images, "label": np.zeros(images.shape[:axes], np.int32)}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_builds(name):
  config, model, fns, _ = build(name)
  assert config.model.name in models.MODELS
  # The network is the one the config names, and every attribute with a key in its section has the config's value.
  objective = config.training.objective
  section, table = {"classifier": (config.classifier, classifier_lib.CLASSIFIERS),
                    "dequantizer": (config.dequantizer, {"dequantizer": dequantizer_lib.VariationalDequantizer}),
                    "score": (config.model, models.MODELS)}[objective]
  assert type(model) is table[network_name(config).lower()]
  for field in dataclasses.fields(model):
    if field.name not in ("parent", "name") and field.name in section:
      value = section[field.name]
      assert getattr(model, field.name) == (tuple(value) if isinstance(value, (list, tuple)) else value), field.name
  assert all(callable(fn) for fn in fns)


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- golden files: every config resolves to what it resolved to when its file was written ----------------------


def resolved(config: ml_collections.ConfigDict) -> dict:
  """What a golden file records of a config: {"values": {dotted key: JSON value}, "types": {dotted key: type name,
  where JSON does not keep it (tuple)}, "references": [[dotted keys that share one field reference], ...]}."""
  values, types, shared = {}, {}, {}

  def visit(section, prefix):
    for key, field in section.items(preserve_field_references=True):
      name = prefix + key
      if isinstance(field, ml_collections.FieldReference):
        shared.setdefault(id(field), []).append(name)
        field = field.get()
      if isinstance(field, ml_collections.ConfigDict):
        visit(field, name + ".")
        continue
      values[name] = json.loads(json.dumps(field, default=repr))
      if not isinstance(field, (bool, int, float, str, list, type(None))):
        types[name] = type(field).__name__

  visit(config, "")
  return {"values": values, "types": types, "references": sorted(sorted(group) for group in shared.values())}


def golden_text(record: dict) -> str:
  """``record`` as reviewable JSON: one key a line, sorted."""
  def block(mapping):
    lines = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(mapping.items()))
    return "{\n" + lines + "\n  }" if mapping else "{}"
  return (f'{{\n  "values": {block(record["values"])},\n  "types": {block(record["types"])},\n'
          f'  "references": {json.dumps(record["references"])}\n}}\n')


def differences(golden: dict, current: dict) -> list[str]:
  """The keys on which two records differ, each as "key: golden ... , now ..."."""
  out = []
  for part in ("values", "types"):
    for key in sorted(golden[part].keys() | current[part].keys()):
      old, new = (json.dumps(r[part][key]) if key in r[part] else "(absent)" for r in (golden, current))
      if old != new:
        out.append(f"{part}: {key}: golden {old}, now {new}")
  if golden["references"] != current["references"]:
    out.append(f"references: golden {golden['references']}, now {current['references']}")
  return out


@pytest.mark.parametrize("name", CONFIGS)
def test_config_matches_its_golden_file(name):
  path = GOLDEN / f"{name}.json"
  text = golden_text(resolved(load(name)))
  if UPDATE_GOLDEN:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  assert path.exists(), f"no golden file {path.relative_to(ROOT)}; write it with UPDATE_GOLDEN=1 (module docstring)"
  diff = differences(json.loads(path.read_text()), json.loads(text))
  assert not diff, (f"{name} no longer resolves to {path.relative_to(ROOT)}:\n  " + "\n  ".join(diff) +
                    "\n(if the change is intended: UPDATE_GOLDEN=1, see the module docstring)")


def test_every_golden_file_has_its_config():
  stale = sorted(str(p.relative_to(GOLDEN).with_suffix("")) for p in GOLDEN.rglob("*.json")
                 if str(p.relative_to(GOLDEN).with_suffix("")) not in CONFIGS)
  if UPDATE_GOLDEN:
    for name in stale:
      (GOLDEN / f"{name}.json").unlink()
    stale = []
  assert not stale, f"golden files without a config: {stale} (remove them, or UPDATE_GOLDEN=1)"
