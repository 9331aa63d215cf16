"""Weight import from the original implementations' checkpoints (``score_sde.convert``).

The reference fixtures (``../shared/fixtures``) hold real state_dicts of the PyTorch port; training
checkpoints of both originals are assembled from them in the originals' file formats.
"""

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import pytest

from score_sde import convert
from score_sde import models
from score_sde.models import wrapper
from tests import test_paper_models as paper

CASE = "ddpmpp_vp_positional"


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference():
  """(config, model, input shape, the fixture's state_dict, its imported params)."""
  config, model, io, ckpt = paper.load_fixture(CASE)
  state_dict = dict(np.load(paper.FIXTURES / CASE / "weights.npz"))
  return config, model, io["x_nhwc"].shape, state_dict, ckpt.params


def _ema_of(params):
  return jax.tree.map(lambda p: np.asarray(p) * 0.5 + 0.25, params)


# --- the PyTorch port -----------------------------------------------------------------------------------


def test_state_dict_round_trip(reference):
  _, model, shape, state_dict, params = reference
  assert wrapper.count_params(params) == sum(v.size for k, v in state_dict.items() if k != "sigmas")
  exported = convert.params_to_torch_state_dict(params, model, shape)
  assert exported.keys() == state_dict.keys()
  for name, value in state_dict.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_every_fixture_maps_every_tensor():
  for case in paper.FIXTURE_CASES:
    _, model, io, ckpt = paper.load_fixture(case)
    state_dict = dict(np.load(paper.FIXTURES / case / "weights.npz"))
    exported = convert.params_to_torch_state_dict(ckpt.params, model, io["x_nhwc"].shape)
    assert exported.keys() == state_dict.keys(), case
    assert ckpt.ema_params is None and ckpt.step is None


def test_pth_training_checkpoint_with_module_prefix_and_ema(reference, tmp_path):
  torch = pytest.importorskip("torch", reason="reading .pth files needs torch (optional)")
  config, model, shape, state_dict, params = reference
  ema_state = convert.params_to_torch_state_dict(_ema_of(params), model, shape)
  # The port's EMA is an unnamed list of the trainable parameters, in state_dict order.
  shadow = [torch.from_numpy(ema_state[name]) for name in state_dict if name != "sigmas"]
  ckpt = {"model": {f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()},
          "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": shadow},
          "optimizer": {"state": {}, "param_groups": []}, "step": 1234}
  torch.save(ckpt, tmp_path / "checkpoint_3.pth")

  state = convert.convert_checkpoint(tmp_path / "checkpoint_3.pth", config)
  assert state["step"] == 1234 and state["has_ema"]
  _assert_trees_equal(state["params"], params)
  _assert_trees_equal(state["ema_params"], _ema_of(params))

  # The same checkpoint exported to .npz loads without torch and gives the same trees.
  convert.pth_to_npz(tmp_path / "checkpoint_3.pth", tmp_path / "checkpoint_3.npz")
  again = convert.load_checkpoint(tmp_path / "checkpoint_3.npz", model, shape)
  assert again.step == 1234
  _assert_trees_equal(again.params, params)
  _assert_trees_equal(again.ema_params, _ema_of(params))


def test_pth_bare_state_dict_equals_npz():
  pytest.importorskip("torch", reason="reading .pth files needs torch (optional)")
  _, model, io, from_npz = paper.load_fixture("ncsnpp_ve_fourier")
  from_pth = convert.load_checkpoint(paper.FIXTURES / "ncsnpp_ve_fourier" / "weights.pth", model, io["x_nhwc"].shape)
  _assert_trees_equal(from_pth.params, from_npz.params)


def test_npz_export_reads_with_numpy_only(reference, tmp_path):
  config, model, shape, state_dict, params = reference
  ema = convert.params_to_torch_state_dict(_ema_of(params), model, shape)
  arrays = {f"model/{k}": v for k, v in state_dict.items()}
  arrays.update({f"ema/{k}": v for k, v in ema.items() if k != "sigmas"})
  np.savez(tmp_path / "export.npz", step=np.asarray(99), **arrays)
  state = convert.convert_checkpoint(tmp_path / "export.npz", config)
  assert state["step"] == 99
  _assert_trees_equal(state["ema_params"], _ema_of(params))


def test_bare_state_dict_gives_params_as_ema(reference):
  config, _, _, _, params = reference
  state = convert.convert_checkpoint(paper.FIXTURES / CASE / "weights.npz", config)
  assert not state["has_ema"] and state["step"] == 0
  _assert_trees_equal(state["ema_params"], params)


def test_missing_unknown_and_misshaped_tensors_are_listed(reference):
  _, model, shape, state_dict, _ = reference
  broken = dict(state_dict)
  del broken["all_modules.2.weight"]
  broken["all_modules.99.Conv_0.weight"] = np.zeros((1,))
  broken["all_modules.3.Conv_1.bias"] = np.zeros((7,))
  with pytest.raises(ValueError) as error:
    convert.torch_state_dict_to_params(broken, model, shape)
  message = str(error.value)
  assert "1 unexpected" in message and "all_modules.99.Conv_0.weight" in message
  assert "1 missing" in message and "all_modules.2.weight" in message
  assert "1 with other shapes" in message and "all_modules.3.Conv_1.bias" in message


def test_a_different_noise_schedule_is_an_error(reference):
  _, model, shape, state_dict, _ = reference
  with pytest.raises(ValueError, match="sigma_max"):
    convert.torch_state_dict_to_params({**state_dict, "sigmas": state_dict["sigmas"] * 2}, model, shape)


def test_ema_list_of_another_model_is_an_error(reference):
  _, model, shape, state_dict, _ = reference
  shadow = [v for k, v in state_dict.items() if k != "sigmas"][:-1]
  with pytest.raises(ValueError, match="EMA holds"):
    convert.convert_torch_state({"model": state_dict, "ema": {"shadow_params": shadow}}, model, shape)


# --- the original JAX code -----------------------------------------------------------------------------


def test_jax_msgpack_training_state(reference, tmp_path):
  config, _, _, _, params = reference
  # The original's State as flax serialises it: the optimizer (target = params), params_ema, step, ...
  numpy_params = jax.tree.map(np.asarray, params)
  state = {"step": 5000, "optimizer": {"target": numpy_params,
                                       "state": {"step": 5000, "param_states": jax.tree.map(np.zeros_like, numpy_params)}},
           "lr": 2e-4, "model_state": {}, "ema_rate": 0.9999, "params_ema": _ema_of(params),
           "rng": np.zeros(2, np.uint32)}
  (tmp_path / "checkpoint_26").write_bytes(flax.serialization.msgpack_serialize(state))
  imported = convert.convert_checkpoint(tmp_path / "checkpoint_26", config)
  assert imported["step"] == 5000 and imported["has_ema"]
  _assert_trees_equal(imported["params"], params)
  _assert_trees_equal(imported["ema_params"], _ema_of(params))


def test_jax_tree_mismatches_are_listed(reference):
  _, model, shape, _, params = reference
  tree = jax.tree.map(np.asarray, params)
  tree["Conv_99"] = {"kernel": np.zeros((3, 3, 3, 8))}
  del tree["Dense_1"]["bias"]
  with pytest.raises(ValueError) as error:
    convert.jax_params_to_params(tree, model, shape)
  assert "Conv_99/kernel" in str(error.value) and "Dense_1/bias" in str(error.value)


def test_unknown_format_and_other_models_are_rejected(reference, tmp_path):
  config, _, _, _, _ = reference
  with pytest.raises(ValueError, match="valid choices"):
    convert.convert_checkpoint(tmp_path / "x", config, format="safetensors")
  with pytest.raises(ValueError, match="no PyTorch-port counterpart"):
    convert.torch_layout(models.MODELS["mlp"](), 16)


# --- NCSNv2 / NCSN: the NCSN authors' tensor names -----------------------------------------------------


def _tiny_ncsnv2():
  """The ve/ncsnv2/cifar10 config at 16x16 with 8 channels, and authors-style tensors of its network."""
  from configs.ve.ncsnv2 import cifar10  # pylint: disable=g-import-not-at-top
  from score_sde.models import layers, ncsnv2  # pylint: disable=g-import-not-at-top
  config = cifar10.get_config()
  config.model.nf, config.data.image_size = 8, 16
  model = models.get_model(config)
  shape = (1, 16, 16, 3)
  shapes = flax.traverse_util.flatten_dict(wrapper.init_model(jax.random.key(0), model, shape, shape_only=True)
                                           ["params"], sep="/")
  rng = np.random.default_rng(0)
  params = {path: rng.normal(size=leaf.shape).astype(np.float32) for path, leaf in shapes.items()}
  tensors = {ncsnv2.authors_name(model, path): (value.transpose(3, 2, 0, 1) if path.endswith("/kernel") else value)
             for path, value in params.items()}
  sigmas = layers.smld_sigmas(model.sigma_min, model.sigma_max, model.num_scales).astype(np.float32)
  return config, flax.traverse_util.unflatten_dict(params, sep="/"), tensors, sigmas


def test_ncsnv2_npz_export_imports_by_the_authors_names(tmp_path):
  config, params, tensors, sigmas = _tiny_ncsnv2()
  arrays = {f"model/module.{k}": v for k, v in tensors.items()}
  arrays.update({f"ema/module.{k}": v * 0.5 for k, v in tensors.items()}, step=np.int64(300))
  arrays["model/module.sigmas"] = sigmas
  np.savez(tmp_path / "ncsnv2.npz", **arrays)
  imported = convert.convert_checkpoint(tmp_path / "ncsnv2.npz", config)
  assert imported["step"] == 300 and imported["has_ema"]
  _assert_trees_equal(imported["params"], params)
  _assert_trees_equal(imported["ema_params"], jax.tree.map(lambda p: p * 0.5, params))


def test_ncsnv2_with_another_noise_table_or_missing_tensors_is_refused(tmp_path):
  config, _, tensors, sigmas = _tiny_ncsnv2()
  model, shape = models.get_model(config), (1, 16, 16, 3)
  with pytest.raises(ValueError, match="noise levels"):
    convert.torch_state_dict_to_params({**tensors, "sigmas": sigmas[::2]}, model, shape)
  with pytest.raises(ValueError, match="missing.*begin_conv.weight"):
    convert.torch_state_dict_to_params({k: v for k, v in tensors.items() if k != "begin_conv.weight"}
                                       | {"sigmas": sigmas}, model, shape)
  with pytest.raises(ValueError, match="sigmas"):
    convert.torch_state_dict_to_params(tensors, model, shape)


def test_ncsn_authors_pth_list_imports(tmp_path):
  torch = pytest.importorskip("torch")
  config, params, tensors, sigmas = _tiny_ncsnv2()
  score = {f"module.{k}": torch.from_numpy(v) for k, v in {**tensors, "sigmas": sigmas}.items()}
  ema = {f"module.{k}": torch.from_numpy(v * 2.0) for k, v in tensors.items()}
  torch.save([score, {"state": {}}, 12, 4500, ema], tmp_path / "checkpoint_4500.pth")
  imported = convert.convert_checkpoint(tmp_path / "checkpoint_4500.pth", config)
  assert imported["step"] == 4500 and imported["has_ema"]
  _assert_trees_equal(imported["params"], params)
  _assert_trees_equal(imported["ema_params"], jax.tree.map(lambda p: p * 2.0, params))
