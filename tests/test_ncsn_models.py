"""NCSN v1, NCSNv2 (64 / 128 / 256), their layers and normalisations, and the noise-conditional classifier.

Ground truth comes from direct numpy computations (normalisations, interpolation), from closed-form
parameter counts written out block by block from the published architectures, and from the SMLD
sigma table computed in numpy, and from the NCSN authors' PyTorch networks (ermongroup/ncsnv2): their
parameter counts and their outputs for given weights. Small networks run on numpy-drawn variables
(shapes from ``jax.eval_shape``, far cheaper than compiling initialisers), each compiled once; the
large variants and every config's network are only traced (``jax.eval_shape``).
"""

import functools
import importlib
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from score_sde import builders, models
from score_sde import sde as sde_lib
from score_sde.models import classifier, ncsn_layers, ncsnv2, normalization, wrapper
from tests import helpers

KEY = jax.random.key(0, impl="unsafe_rbg")
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
EPS = 1e-5


def _random_variables(model, shape, seed=0, scale=0.3):
  """Variables of ``model`` for inputs ``shape``, with N(0, scale^2) leaves drawn by numpy."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(scale * rng.normal(size=leaf.shape), jnp.float32),
                      wrapper.init_model(KEY, model, shape, shape_only=True))


# Tiny networks compile in about half the time with LLVM's optimisations off, and run as fast.
FAST_COMPILE = helpers.FAST_COMPILE


@functools.cache
def _jit_apply(model):
  """``model.apply``, compiled (faster than running a network's ops eagerly the first time)."""
  return jax.jit(model.apply, compiler_options=FAST_COMPILE)


def _apply(model, variables, x, labels):
  with jax.default_matmul_precision("highest"):  # full float32 convolutions on GPUs too (no TF32)
    return np.asarray(_jit_apply(model)(variables, x, labels), np.float64)


def _param_shapes(model, shape):
  variables = wrapper.init_model(KEY, model, shape, shape_only=True)
  return flax.traverse_util.flatten_dict(variables["params"], sep="/")


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _smld_sigmas(sigma_min, sigma_max, n):
  """The descending SMLD table, float64: index 0 is sigma_max."""
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))


# --- Normalisations -------------------------------------------------------------------------------


def _numpy_instance_stats(x):
  mu = x.mean(axis=(1, 2))
  h = (x - mu[:, None, None]) / np.sqrt(x.var(axis=(1, 2))[:, None, None] + EPS)
  m = (mu - mu.mean(-1, keepdims=True)) / np.sqrt(mu.var(-1, ddof=1, keepdims=True) + EPS)
  return h, m[:, None, None]


def _norm_input():
  rng = np.random.default_rng(1)  # Channel offsets and scales, so every statistic matters.
  return rng.normal(size=(3, 5, 4, 6)) * rng.uniform(0.5, 3.0, size=6) + rng.normal(size=(3, 1, 1, 6)) * 2


def _apply_random(layer, x, *args):
  variables = _random_variables_of_layer(layer, x, *args)
  return np.asarray(layer.apply(variables, jnp.asarray(x, jnp.float32), *args), np.float64), variables


def _random_variables_of_layer(layer, x, *args):
  shapes = jax.eval_shape(lambda k: layer.init(k, jnp.asarray(x, jnp.float32), *args), KEY)
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


def test_instance_norms_match_numpy():
  x = _norm_input()
  out, v = _apply_random(normalization.InstanceNorm2d(), x)
  p = jax.tree.map(np.asarray, v["params"])
  np.testing.assert_allclose(out, _numpy_instance_stats(x)[0] * p["scale"] + p["bias"], rtol=1e-4, atol=1e-4)

  out, v = _apply_random(normalization.InstanceNorm2dPlus(), x)
  p = jax.tree.map(np.asarray, v["params"])
  h, m = _numpy_instance_stats(x)
  np.testing.assert_allclose(out, p["gamma"] * (h + m * p["alpha"]) + p["beta"], rtol=1e-4, atol=1e-4)


def test_conditional_instance_norm_plus_looks_up_its_label_row():
  x, y = _norm_input(), jnp.array([4, 0, 4])
  out, v = _apply_random(normalization.ConditionalInstanceNorm2dPlus(num_classes=5), x, y)
  table = np.asarray(v["params"]["Embed_0"]["embedding"], np.float64)
  assert table.shape == (5, 18)
  gamma, alpha, beta = (table[np.asarray(y)][:, None, None, k * 6:(k + 1) * 6] for k in range(3))
  h, m = _numpy_instance_stats(x)
  np.testing.assert_allclose(out, gamma * (h + m * alpha) + beta, rtol=1e-4, atol=1e-4)
  # Labels outside the table give NaN, not a silently clamped row.
  layer = normalization.ConditionalInstanceNorm2dPlus(num_classes=5)
  assert np.isnan(np.asarray(layer.apply(v, jnp.asarray(x, jnp.float32), jnp.array([0, 5, 1])))[1]).all()


def test_variance_norm_matches_numpy():
  x = _norm_input()
  out, v = _apply_random(normalization.VarianceNorm2d(), x)
  scale = np.asarray(v["params"]["scale"])
  np.testing.assert_allclose(out, x / np.sqrt(x.var(axis=(1, 2), ddof=1, keepdims=True) + EPS) * scale,
                             rtol=1e-4, atol=1e-4)


def test_normalization_initialisation():
  x = jnp.asarray(_norm_input(), jnp.float32)
  v = normalization.InstanceNorm2dPlus().init(KEY, x)["params"]
  assert np.all(v["beta"] == 0)
  assert np.all(np.abs(v["gamma"] - 1) < 0.1) and np.all(np.abs(v["alpha"] - 1) < 0.1)
  table = normalization.ConditionalInstanceNorm2dPlus(num_classes=50).init(KEY, x, jnp.zeros(3, jnp.int32))
  table = np.asarray(table["params"]["Embed_0"]["embedding"])
  assert np.all(table[:, 12:] == 0)  # beta starts at 0, gamma and alpha at N(1, 0.02^2)
  assert abs(table[:, :12].mean() - 1) < 0.01 and 0.015 < table[:, :12].std() < 0.025


@pytest.mark.parametrize("channels, groups", [(128, 32), (256, 32), (48, 24), (8, 8), (6, 6)])
def test_group_norm_groups_divide_channels(channels, groups):
  assert normalization.get_normalization("GroupNorm")(channels).num_groups == groups


def test_get_normalization_rejects_bad_requests():
  with pytest.raises(ValueError, match="valid choices"):
    normalization.get_normalization("BatchNorm")
  with pytest.raises(ValueError, match="valid choices"):
    normalization.get_normalization("InstanceNorm", conditional=True, num_classes=3)
  with pytest.raises(ValueError, match="num_classes"):
    normalization.get_normalization("InstanceNorm++", conditional=True)


# --- Layers ---------------------------------------------------------------------------------------


def test_align_corners_resize_matches_numpy_interpolation():
  x = np.random.default_rng(3).normal(size=(2, 3, 4, 2))
  out = np.asarray(ncsn_layers.resize(jnp.asarray(x, jnp.float32), (7, 5), "bilinear_align_corners"))
  rows = np.linspace(0, 2, 7)  # align_corners: output pixel j samples input position j (H - 1) / (H' - 1)
  cols = np.linspace(0, 3, 5)
  expected = np.empty((2, 7, 5, 2))
  for b in range(2):
    for c in range(2):
      by_row = np.stack([np.interp(rows, np.arange(3), x[b, :, j, c]) for j in range(4)], axis=1)
      expected[b, :, :, c] = np.stack([np.interp(cols, np.arange(4), r) for r in by_row])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  half_pixel = np.asarray(ncsn_layers.resize(jnp.asarray(x, jnp.float32), (7, 5), "bilinear"))
  assert np.abs(half_pixel - expected).max() > 1e-2  # the two conventions differ
  with pytest.raises(ValueError, match="valid choices"):
    ncsn_layers.resize(jnp.asarray(x), (7, 5), "bicubic")


def test_conv_uses_pytorch_initialisation():
  class One(flax.linen.Module):
    @flax.linen.compact
    def __call__(self, x):
      return ncsn_layers.conv(x, 64, dilation=2)

  params = One().init(KEY, jnp.zeros((1, 8, 8, 16)))["params"]["Conv_0"]
  bound = 1 / np.sqrt(9 * 16)
  for w in (params["kernel"], params["bias"]):
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound


def test_activations_by_name():
  assert ncsn_layers.get_act("ELU") is flax.linen.elu
  np.testing.assert_allclose(ncsn_layers.get_act("lrelu")(jnp.array([-1.0, 2.0])), [-0.2, 2.0])
  with pytest.raises(ValueError, match="valid choices"):
    ncsn_layers.get_act("gelu")


# --- NCSNv2 ---------------------------------------------------------------------------------------


def _conv_params(k, cin, cout, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def _refinenet_params(nf, channels, norm, conditional):
  """Parameters of the 64 px RefineNet (NCSNv2 / NCSN v1), block by block, as the authors define it.

  ``norm(C)`` is the parameter count of one normalisation of C channels; NCSN v1 (``conditional``)
  also normalises inside its RCU, CRP and MSF blocks.
  """
  inner = norm if conditional else (lambda c: 0)

  def res(cin, cout, down, dilation):
    shortcut = _conv_params(1 if dilation == 1 else 3, cin, cout)
    if down:
      return norm(cin) + _conv_params(3, cin, cin) + norm(cin) + _conv_params(3, cin, cout) + shortcut
    return (norm(cin) + _conv_params(3, cin, cout) + norm(cout) + _conv_params(3, cout, cout)
            + (shortcut if cin != cout else 0))

  def rcu(c, blocks):
    return blocks * 2 * (inner(c) + _conv_params(3, c, c, bias=False))

  def refine(ins, c, start=False, end=False):
    adapt = sum(rcu(cin, 2) for cin in ins)
    msf = 0 if start else sum(inner(cin) + _conv_params(3, cin, c) for cin in ins)
    crp = 2 * (inner(c) + _conv_params(3, c, c, bias=False))
    return adapt + msf + crp + rcu(c, 3 if end else 1)

  w = 2 * nf
  return (_conv_params(3, channels, nf)
          + res(nf, nf, False, 1) + res(nf, nf, False, 1)        # res1
          + res(nf, w, True, 1) + res(w, w, False, 1)            # res2: mean-pool downsampling
          + res(w, w, True, 2) + res(w, w, False, 2)             # res3: dilation 2
          + res(w, w, True, 4) + res(w, w, False, 4)             # res4: dilation 4
          + refine([w], w, start=True) + refine([w, w], w) + refine([w, w], nf)
          + refine([nf, nf], nf, end=True)
          + norm(nf) + _conv_params(3, nf, channels))


# Parameter counts of the NCSN authors' PyTorch networks (ermongroup/ncsnv2 ``NCSNv2``, ``NCSNv2Deeper``,
# ``NCSNv2Deepest`` and ``NCSN``) with ngf = 128, counted by instantiating them in PyTorch. The v1
# network's count depends on its number of noise levels (one row of every normalisation table each).
AUTHORS_COUNTS = {"ncsnv2_64": 29_694_083, "ncsnv2_128": 83_445_379, "ncsnv2_256": 94_132_611,
                  ("ncsn", 10): 30_117_635, ("ncsn", 232): 39_750_659, ("ncsn", 500): 51_379_715}


@pytest.mark.parametrize("model, expected", [
    (ncsnv2.NCSNv2(nf=128), AUTHORS_COUNTS["ncsnv2_64"]),
    (ncsnv2.NCSNv2_256(nf=128), AUTHORS_COUNTS["ncsnv2_256"]),
    (ncsnv2.NCSN(nf=128, num_scales=232), AUTHORS_COUNTS[("ncsn", 232)]),
])
def test_parameter_counts_match_the_closed_form_and_the_authors_networks(model, expected):
  count = wrapper.count_params(_param_shapes(model, (1, 32, 32, 3)))
  assert count == expected
  if type(model) is not ncsnv2.NCSNv2_256:
    per_norm = 3 * model.num_scales if isinstance(model, ncsnv2.NCSN) else 3
    assert count == _refinenet_params(128, 3, lambda c: per_norm * c, conditional=isinstance(model, ncsnv2.NCSN))


def test_ncsn_v1_parameter_count_of_a_tiny_network():
  model = ncsnv2.NCSN(nf=8, num_scales=4)
  count = wrapper.count_params(_param_shapes(model, (1, 32, 32, 3)))
  assert count == _refinenet_params(8, 3, lambda c: 4 * 3 * c, conditional=True)


def test_ncsnv2_parameter_names_follow_the_documented_mapping():
  nf = 8
  p = _param_shapes(ncsnv2.NCSNv2(nf=nf), (1, 16, 16, 3))
  assert {k.split("/")[0] for k in p} == {"Conv_0", "Conv_1", "InstanceNorm2dPlus_0",
                                          *(f"ResidualBlock_{i}" for i in range(8)),
                                          *(f"RefineBlock_{i}" for i in range(4))}
  # res2.0 downsamples with ConvMeanPools; res3.0 is dilated, with a 3x3 shortcut; res1.1 has none.
  assert p["ResidualBlock_2/conv2/Conv_0/kernel"].shape == (3, 3, nf, 2 * nf)
  assert p["ResidualBlock_2/shortcut/Conv_0/kernel"].shape == (1, 1, nf, 2 * nf)
  assert p["ResidualBlock_4/shortcut/kernel"].shape == (3, 3, 2 * nf, 2 * nf)

  def children(block):
    return {k.split("/")[1] for k in p if k.startswith(block + "/")}

  assert children("ResidualBlock_1") == {"normalize1", "conv1", "normalize2", "conv2"}
  assert children("RefineBlock_0") == {"RCUBlock_0", "CRPBlock_0", "RCUBlock_1"}  # the start: no fusion
  assert p["RefineBlock_3/MSFBlock_0/Conv_1/kernel"].shape == (3, 3, nf, nf)  # refine4 fuses nf-wide ref3
  assert "RefineBlock_3/RCUBlock_2/Conv_5/kernel" in p  # the last block's output RCU has 3 units of 2 convs


def test_authors_names_cover_every_parameter_once():
  cases = [(ncsnv2.NCSNv2_256(nf=4), (1, 32, 32, 3), {
      "Conv_0/kernel": "begin_conv.weight",
      "InstanceNorm2dPlus_0/alpha": "normalizer.alpha",
      "ResidualBlock_2/shortcut/Conv_0/bias": "res2.0.shortcut.conv.bias",
      "ResidualBlock_7/conv1/kernel": "res31.1.conv1.weight",
      "ResidualBlock_8/normalize2/gamma": "res4.0.normalize2.gamma",
      "RefineBlock_2/MSFBlock_0/Conv_1/kernel": "refine31.msf.convs.1.weight",
      "RefineBlock_3/RCUBlock_1/Conv_2/kernel": "refine3.adapt_convs.1.2_1_conv.weight",
      "RefineBlock_5/RCUBlock_2/Conv_5/kernel": "refine5.output_convs.3_2_conv.weight",
  }), (ncsnv2.NCSN(nf=4, num_scales=3), (1, 8, 8, 1), {
      "ConditionalResidualBlock_0/normalize1/Embed_0/embedding": "res1.0.normalize1.embed.weight",
      "CondRefineBlock_0/CondRCUBlock_0/ConditionalInstanceNorm2dPlus_3/Embed_0/embedding":
          "refine1.adapt_convs.0.2_2_norm.embed.weight",
      "CondRefineBlock_1/CondCRPBlock_0/ConditionalInstanceNorm2dPlus_1/Embed_0/embedding":
          "refine2.crp.norms.1.embed.weight",
      "CondRefineBlock_3/CondMSFBlock_0/Conv_0/bias": "refine4.msf.convs.0.bias",
  })]
  for model, shape, expected in cases:
    names = {path: ncsnv2.authors_name(model, path) for path in _param_shapes(model, shape)}
    assert len(set(names.values())) == len(names)
    assert {path: names[path] for path in expected} == expected
  with pytest.raises(ValueError, match="no counterpart"):
    ncsnv2.authors_name(ncsnv2.NCSNv2(normalization="InstanceNorm"), "InstanceNorm2d_0/scale")


def test_authors_state_dict_imports_strictly():
  model = ncsnv2.NCSNv2_128(**SMALL)
  shape = (1, 8, 8, 1)
  params = _random_variables(model, shape)["params"]
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  # The authors' layout (OIHW kernels), with DataParallel's prefix and the sigma buffer.
  state = {"module." + ncsnv2.authors_name(model, path): np.asarray(v).transpose(3, 2, 0, 1) if v.ndim == 4
           else np.asarray(v) for path, v in flat.items()}
  state["module.sigmas"] = SMALL_SIGMAS.astype(np.float32)
  imported = ncsnv2.from_authors_state_dict(model, state, shape)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), imported, params))
  key = "module." + ncsnv2.authors_name(model, "RefineBlock_4/RCUBlock_2/Conv_0/kernel")
  with pytest.raises(ValueError, match=r"missing \['refine5.output_convs.1_1_conv.weight'\]"):
    ncsnv2.from_authors_state_dict(model, {k: v for k, v in state.items() if k != key}, shape)
  with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
    ncsnv2.from_authors_state_dict(model, {**state, "extra.weight": np.zeros(1)}, shape)
  with pytest.raises(ValueError, match="noise levels"):
    ncsnv2.from_authors_state_dict(model.clone(num_scales=7), state, shape)


@pytest.mark.parametrize("cls, shape", [
    (ncsnv2.NCSNv2, (2, 32, 32, 3)),
    (ncsnv2.NCSNv2_128, (1, 128, 128, 3)),
    (ncsnv2.NCSNv2_256, (1, 256, 256, 3)),
    (ncsnv2.NCSN, (2, 32, 32, 3)),
])
def test_output_shapes(cls, shape):
  model = cls(nf=4, num_scales=4)  # NCSN: 4 noise levels
  variables = wrapper.init_model(KEY, model, shape, shape_only=True)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  y = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
  assert jax.eval_shape(model.apply, variables, x, y).shape == shape


def test_dilated_stages_keep_the_resolution():
  model = ncsnv2.NCSNv2_128(nf=4)
  shape = (1, 64, 64, 3)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, jnp.zeros(1), capture_intermediates=True, mutable=["intermediates"]),
      wrapper.init_model(KEY, model, shape, shape_only=True), jax.ShapeDtypeStruct(shape, jnp.float32))
  sizes = [state["intermediates"][f"ResidualBlock_{i}"]["__call__"][0].shape[1:] for i in range(0, 10, 2)]
  assert sizes == [(64, 64, 4), (32, 32, 8), (16, 16, 8), (16, 16, 16), (16, 16, 16)]


def test_input_sizes_are_checked():
  with pytest.raises(ValueError, match="multiples of 8"):
    wrapper.init_model(KEY, ncsnv2.NCSNv2_256(nf=4), (1, 36, 36, 3), shape_only=True)
  with pytest.raises(ValueError, match="valid choices"):
    wrapper.init_model(KEY, ncsnv2.NCSNv2(nf=4, interpolation="cubic"), (1, 8, 8, 3), shape_only=True)


# Every test of a small network uses these settings and shapes, so each network compiles once.
SMALL = dict(nf=4, sigma_min=0.02, sigma_max=8.0, num_scales=6, interpolation="bilinear_align_corners")
SMALL_SHAPE = (3, 8, 8, 1)
SMALL_SIGMAS = _smld_sigmas(SMALL["sigma_min"], SMALL["sigma_max"], SMALL["num_scales"])


def _one_image_thrice():
  return jnp.broadcast_to(_images((1,) + SMALL_SHAPE[1:]), SMALL_SHAPE)


def test_scale_by_sigma_divides_by_the_descending_table():
  """Discrete labels k index the descending table, the VE SDE's own sigmas in reverse."""
  model = ncsnv2.NCSNv2(**SMALL)  # scale_by_sigma and discrete labels are the defaults
  sde = sde_lib.VESDE(SMALL["sigma_min"], SMALL["sigma_max"], SMALL["num_scales"])
  np.testing.assert_allclose(SMALL_SIGMAS, sde.discrete_sigmas[::-1], rtol=1e-12)
  out = _apply(model, _random_variables(model, SMALL_SHAPE), _one_image_thrice(), jnp.array([0.0, 3.0, 5.0]))
  # NCSNv2 is unconditional but for the division, so sigma_k times the output is the same at every level.
  unscaled = out * SMALL_SIGMAS[[0, 3, 5], None, None, None]
  np.testing.assert_allclose(unscaled[1:], unscaled[[0, 0]], rtol=1e-5, atol=1e-6)
  assert np.abs(out[0] - out[2]).max() > 1.0  # the division matters


def test_continuous_sigma_labels_and_centred_inputs():
  """Through the score wrapper: continuous VE labels are sigma(t) itself; centred inputs skip 2x - 1."""
  model = ncsnv2.NCSNv2(**SMALL)
  variables = _random_variables(model, SMALL_SHAPE)
  x = _images(SMALL_SHAPE)
  unscaled = _apply(model, variables, x, jnp.array([0.0, 3.0, 5.0])) * SMALL_SIGMAS[[0, 3, 5], None, None, None]
  sde = sde_lib.VESDE(SMALL["sigma_min"], SMALL["sigma_max"], SMALL["num_scales"])
  sigma = np.array([0.05, 1.0, 7.5])  # 1.0 would be a table index if read as one
  t = np.log(sigma / SMALL["sigma_min"]) / np.log(SMALL["sigma_max"] / SMALL["sigma_min"])
  score_fn = wrapper.get_score_fn(sde, model.clone(continuous=True, centered=True), variables, continuous=True)
  score = jax.jit(lambda f, x, t: f(x, t), compiler_options=FAST_COMPILE)(score_fn, 2 * x - 1, jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(score, np.float64), unscaled / sigma[:, None, None, None], rtol=1e-4,
                             atol=1e-6)


def test_ncsn_conditions_on_the_noise_index():
  model = ncsnv2.NCSN(**SMALL)
  variables = _random_variables(model, SMALL_SHAPE)
  x = _one_image_thrice()
  out = _apply(model, variables, x, jnp.array([1.0, 4.0, 1.0]))
  assert np.abs(out[0] - out[1]).max() > 1e-3  # different noise levels, different outputs
  np.testing.assert_allclose(out[0], out[2], rtol=1e-6)
  out = _apply(model, variables, x, jnp.array([1.0, 6.0, 5.0]))
  assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()  # index 6 is outside the 6 levels


# Outputs of the NCSN authors' PyTorch networks (ermongroup/ncsnv2 ``NCSNv2`` and ``NCSN``)
# with ngf = 4, 6 noise levels in [0.02, 8], given exactly the weights ``_random_variables`` draws here
# (each leaf loaded under ``ncsnv2.authors_name`` with strict key checking; kernels HWIO -> OIHW) and
# the images ``_images(SMALL_SHAPE, seed=1)``: out[b, i, j, 0] at PARITY_PIXELS, and mean |out| per image.
PARITY_PIXELS = [(0, 0, 0), (0, 3, 5), (1, 7, 7), (1, 2, 1), (2, 4, 6), (2, 6, 0)]
PARITY = [
    (ncsnv2.NCSNv2, (0, 3, 5), [-0.02779627, -0.09070757, -5.18907, -4.1351, -35.24486, -33.07533],
     [0.107244, 3.885456, 42.98415]),
    (ncsnv2.NCSN, (1, 4, 0), [0.1158368, 0.9475426, 0.4850878, 1.269163, -0.4362682, 0.6306999],
     [0.3987013, 0.6661491, 0.482134]),
]


@pytest.mark.parametrize("cls, labels, pixels, abs_means", PARITY)
def test_outputs_match_the_authors_pytorch_networks(cls, labels, pixels, abs_means):
  model = cls(**SMALL)
  out = _apply(model, _random_variables(model, SMALL_SHAPE), _images(SMALL_SHAPE, seed=1),
               jnp.asarray(labels, jnp.float32))
  np.testing.assert_allclose([out[b, i, j, 0] for b, i, j in PARITY_PIXELS], pixels, rtol=2e-5)
  np.testing.assert_allclose(np.abs(out).mean(axis=(1, 2, 3)), abs_means, rtol=2e-5)


@pytest.mark.slow
def test_every_parameter_receives_a_finite_gradient():
  model = ncsnv2.NCSNv2(**SMALL)
  variables = _random_variables(model, SMALL_SHAPE, scale=0.1)
  x, labels = _images(SMALL_SHAPE), jnp.array([0.0, 2.0, 5.0])

  def loss(params):
    return jnp.mean(model.apply({"params": params}, x, labels) ** 2)

  grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(variables["params"])
  grads = flax.traverse_util.flatten_dict(grads, sep="/")
  norms = {name: float(jnp.linalg.norm(g)) for name, g in grads.items()}
  assert all(np.isfinite(n) for n in norms.values())
  assert [name for name, n in norms.items() if n == 0] == []  # no parameter is left out of the network


def test_ncsn_num_classes_is_derived_from_num_scales():
  config = default.get_default_configs()
  config.model.update(name="ncsn", nf=4, num_scales=7)
  config.training.continuous = False
  model = models.get_model(config)
  assert isinstance(model, ncsnv2.NCSN) and model.num_classes == 0 and model.num_levels == 7
  p = _param_shapes(model, (1, 8, 8, 1))
  assert p["ConditionalInstanceNorm2dPlus_0/Embed_0/embedding"].shape == (7, 12)
  assert _param_shapes(ncsnv2.NCSN(nf=4, num_classes=7, num_scales=7), (1, 8, 8, 1)).keys() == p.keys()
  with pytest.raises(ValueError, match="num_classes must equal num_scales"):
    wrapper.init_model(KEY, ncsnv2.NCSN(nf=4, num_classes=10, num_scales=7), (1, 8, 8, 1), shape_only=True)
  with pytest.raises(ValueError, match="continuous = False"):
    wrapper.init_model(KEY, ncsnv2.NCSN(nf=4, continuous=True), (1, 8, 8, 1), shape_only=True)


@pytest.mark.parametrize("name, cls", [("ncsn", ncsnv2.NCSN), ("ncsnv2_64", ncsnv2.NCSNv2),
                                       ("ncsnv2_128", ncsnv2.NCSNv2_128), ("ncsnv2_256", ncsnv2.NCSNv2_256)])
def test_get_model_passes_ncsn_fields(name, cls):
  config = default.get_default_configs()
  config.model.update(name=name, nf=32, normalization="GroupNorm", nonlinearity="elu", sigma_max=90.0,
                      interpolation="bilinear_align_corners", num_scales=500, scale_by_sigma=True)
  config.data.centered = True
  config.training.continuous = False
  model = models.get_model(config)
  assert type(model) is cls
  assert (model.nf, model.normalization, model.nonlinearity, model.interpolation, model.sigma_max,
          model.num_scales, model.scale_by_sigma, model.centered, model.continuous) == (
              32, "GroupNorm", "elu", "bilinear_align_corners", 90.0, 500, True, True, False)
  hash(model)


# --- Noise-conditional classifier -----------------------------------------------------------------


def _wide_resnet_params(depth, k, num_classes, channels, embedding_size):
  """WRN parameters, written out: embedding MLP, stem, 3 groups of n blocks, pooled logits."""
  n, t = (depth - 4) // 6, 4 * embedding_size
  count = embedding_size + (2 * embedding_size * t + t) + (t * t + t) + 9 * channels * 16
  c_in = 16
  for width in (16 * k, 32 * k, 64 * k):
    for b in range(n):
      cin = c_in if b == 0 else width
      count += 2 * cin + 9 * cin * width + (t * width + width) + 2 * width + 9 * width * width
    c_in = width
  return count + 2 * c_in + c_in * num_classes + num_classes


def test_wide_resnet_28_10_structure_and_parameter_count():
  model = classifier.get_classifier(default.get_default_configs())
  assert (model.depth, model.widen_factor, model.num_classes) == (28, 10, 10)
  p = _param_shapes(model, (1, 32, 32, 3))
  # 38,913,242: the count of the original's WideResnet(blocks_per_group=4, channel_multiplier=10), traced.
  assert wrapper.count_params(p) == _wide_resnet_params(28, 10, 10, 3, 128) == 38_913_242
  assert {k.split("/")[0] for k in p} == {"GaussianFourierProjection_0", "Dense_0", "Dense_1", "init_conv",
                                          "WideResnetGroup_0", "WideResnetGroup_1", "WideResnetGroup_2",
                                          "pre-pool-bn", "Dense_2"}
  assert {k.split("/")[2] for k in p if k.startswith("WideResnetGroup_1/WideResnetBlock_3/")} == {
      "init_bn", "conv1", "Dense_0", "bn_2", "conv2"}


@pytest.mark.parametrize("shape", [(3, 8, 8, 1), (3, 16, 16, 3)])
def test_small_classifier_logits(shape):
  model = classifier.small_wide_resnet(num_classes=5)
  variables = _random_variables(model, shape)
  assert wrapper.count_params(variables) == _wide_resnet_params(10, 2, 5, shape[-1], 32)
  x, sigma = _images(shape), jnp.array([0.01, 0.5, 20.0])
  logits = _apply(model, variables, x, sigma)
  assert logits.shape == (3, 5) and np.isfinite(logits).all()
  # Per-image standardisation: invariant to an affine change of each image's intensities.
  np.testing.assert_allclose(_apply(model, variables, 3.0 * x - 1.5, sigma), logits, rtol=1e-4, atol=1e-4)
  # The noise level conditions the logits.
  assert np.abs(_apply(model, variables, x, sigma[::-1]) - logits).max() > 1e-3


def test_classifier_input_normalisation():
  shape = (3, 16, 16, 3)
  plain = classifier.small_wide_resnet(num_classes=5)
  model = plain.clone(input_mean=classifier.CIFAR10_MEAN, input_std=classifier.CIFAR10_STD)
  variables = _random_variables(model, shape)
  x, sigma = _images(shape), jnp.array([0.01, 0.5, 20.0])
  normalised = (x - jnp.asarray(classifier.CIFAR10_MEAN)) / jnp.asarray(classifier.CIFAR10_STD)
  np.testing.assert_allclose(_apply(model, variables, x, sigma), _apply(plain, variables, normalised, sigma),
                             rtol=1e-4, atol=1e-4)


def test_get_classifier_passes_config_fields():
  config = default.get_default_configs()
  config.classifier.update(depth=16, widen_factor=2, num_classes=3, embedding_size=8,
                           input_mean=list(classifier.CIFAR10_MEAN), input_std=list(classifier.CIFAR10_STD))
  model = classifier.get_classifier(config)
  assert (model.depth, model.widen_factor, model.num_classes, model.embedding_size) == (16, 2, 3, 8)
  assert model.input_mean == classifier.CIFAR10_MEAN and hash(model)
  config.classifier.name = "resnet"
  with pytest.raises(ValueError, match="valid choices"):
    classifier.get_classifier(config)


def test_classifier_rejects_bad_shapes():
  with pytest.raises(ValueError, match="depth 6 n"):
    wrapper.init_model(KEY, classifier.WideResnet(depth=12), (1, 8, 8, 3), shape_only=True)
  with pytest.raises(ValueError, match="multiples of 4"):
    wrapper.init_model(KEY, classifier.small_wide_resnet(), (1, 6, 6, 3), shape_only=True)
  with pytest.raises(ValueError, match="one value per channel"):
    wrapper.init_model(KEY, classifier.small_wide_resnet(input_mean=(0.5,), input_std=(0.2,)), (1, 8, 8, 3),
                       shape_only=True)


# --- Configs ---------------------------------------------------------------------------------------

# Config -> (network, parameters, N, sigma_max, EMA rate, ALD snr, Langevin steps per level, lr): the
# original's values (its ve/ncsn and ve/ncsnv2 files); counts from AUTHORS_COUNTS.
CONFIGS = {
    "ve/ncsnv2/cifar10": ("ncsnv2_64", AUTHORS_COUNTS["ncsnv2_64"], 232, 50.0, 0.999, 0.176, 5, 1e-4),
    "ve/ncsnv2/celeba": ("ncsnv2_64", AUTHORS_COUNTS["ncsnv2_64"], 500, 90.0, 0.999, 0.128, 5, 1e-4),
    "ve/ncsnv2/bedroom": ("ncsnv2_128", AUTHORS_COUNTS["ncsnv2_128"], 1086, 190.0, 0.9999, 0.095, 3, 1e-4),
    "ve/ncsn/cifar10": ("ncsn", AUTHORS_COUNTS[("ncsn", 10)], 10, 1.0, 0.0, 0.316, 100, 1e-3),
    "ve/ncsn/celeba": ("ncsn", AUTHORS_COUNTS[("ncsn", 10)], 10, 1.0, 0.0, 0.316, 100, 1e-3),
    "ve/ncsn/cifar10_124": ("ncsn", AUTHORS_COUNTS[("ncsn", 232)], 232, 50.0, 0.0, 0.176, 5, 1e-3),
    "ve/ncsn/celeba_124": ("ncsn", AUTHORS_COUNTS[("ncsn", 500)], 500, 90.0, 0.0, 0.128, 5, 1e-3),
    "ve/ncsn/cifar10_1245": ("ncsn", AUTHORS_COUNTS[("ncsn", 232)], 232, 50.0, 0.999, 0.176, 5, 1e-3),
    "ve/ncsn/celeba_1245": ("ncsn", AUTHORS_COUNTS[("ncsn", 500)], 500, 90.0, 0.999, 0.128, 5, 1e-3),
    "ve/ncsn/cifar10_5": ("ncsn", AUTHORS_COUNTS[("ncsn", 10)], 10, 1.0, 0.999, 0.316, 100, 1e-3),
    "ve/ncsn/celeba_5": ("ncsn", AUTHORS_COUNTS[("ncsn", 10)], 10, 1.0, 0.999, 0.316, 100, 1e-3),
}


def _load(name):
  return importlib.import_module("configs." + name.replace("/", ".")).get_config()


def _keys(config, prefix=""):
  return {prefix + k for k, v in config.items() for k in ([k] if not hasattr(v, "items") else
                                                            [f"{k}.{sub}" for sub in _keys(v)])}


def _values(config):
  return [w for v in config.values() for w in (_values(v) if hasattr(v, "items") else [v])]


def _check_declared(config):
  """Every key is declared in configs/default.py, so a misspelt key (``continuouse``) cannot slip in."""
  undeclared = _keys(config) - _keys(default.get_default_configs())
  assert not undeclared, f"keys not declared in configs/default.py: {sorted(undeclared)}"


def test_config_tables_cover_every_config_file():
  files = {str(p.relative_to(CONFIG_DIR).with_suffix("")) for d in ("ve/ncsn", "ve/ncsnv2")
           for p in (CONFIG_DIR / d).glob("*.py") if p.stem != "__init__"}
  assert files == set(CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_reproduces_the_original_and_builds_its_network(name):
  network, count, num_scales, sigma_max, ema_rate, snr, n_steps, lr = CONFIGS[name]
  config = _load(name)
  _check_declared(config)
  model, training, sampling = config.model, config.training, config.sampling
  assert (model.name, model.num_scales, model.sigma_min, model.sigma_max, model.ema_rate) == (
      network, num_scales, 0.01, sigma_max, ema_rate)
  assert (training.sde, training.continuous, model.discretization) == ("vesde", False, "table")
  assert (sampling.method, sampling.predictor, sampling.corrector, sampling.snr, sampling.n_steps_each,
          sampling.noise_removal) == ("pc", "none", "ald", snr, n_steps, True)
  assert (config.optim.lr, config.optim.warmup, config.optim.grad_clip) == (lr, 0, -1.0)
  assert (model.nf, model.normalization, model.nonlinearity, model.scale_by_sigma) == (
      128, "InstanceNorm++", "elu", network != "ncsn")
  assert not config.data.data_dir and not [v for v in _values(config) if str(v).startswith(("/", "~"))]
  builders.validate(config)  # names (data set, sampler, ...) exist
  # The network, traced at the config's image size (nothing is computed).
  net = models.get_model(config)
  assert net.continuous is False and getattr(net, "num_levels", num_scales) == num_scales
  size, channels = config.data.image_size, config.data.num_channels
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  out, variables = jax.eval_shape(
      lambda k, x: net.init_with_output(k, x, jnp.zeros(2), train=False), KEY, x)
  assert out.shape == x.shape
  assert wrapper.count_params(variables) == count


def test_ncsn_configs_declare_their_number_of_classes():
  config = _load("ve/ncsn/cifar10_124")
  assert config.model.num_classes == config.model.num_scales == 232
  config.model.num_scales = 50  # a command-line override of N changes the number of classes with it
  assert config.model.num_classes == 50 and models.get_model(config).num_levels == 50


def test_digits_classifier_config():
  config = _load("classifier/digits_wrn")
  _check_declared(config)
  builders.validate(config)
  model = classifier.get_classifier(config)
  assert (model.depth, model.widen_factor, model.num_classes, model.embedding_size) == (10, 2, 10, 32)
  shape = (2, config.data.image_size, config.data.image_size, config.data.num_channels)
  logits, variables = jax.eval_shape(
      lambda k: model.init_with_output(k, jnp.zeros(shape), jnp.ones(2), train=False), KEY)
  assert logits.shape == (2, 10)
  assert wrapper.count_params(variables) == _wide_resnet_params(10, 2, 10, 1, 32)
  assert 0 < config.model.sigma_min < config.model.sigma_max
