"""Score networks, the model name table, and the network -> score wrapper.

The wrapper's conventions are checked with a fake network whose output is known:
out = w (x + [labels, 1]) on 2-D inputs, so at x = 0 the score is c w [labels, 1], where c is the
factor the parameterisation applies (-1 / sigma for noise predictors, 1 or 1 / sigma for VE).
Both the labels the network received and c follow from one call; the expected values come from
closed forms in float64 and from the SDE's tables.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from score_sde import losses
from score_sde import models
from score_sde import sde as sde_lib
from score_sde.models import layers, mlp, ncsnpp, unet, wrapper

# RngBitGenerator keys compile the networks' initialisers several times faster than threefry.
KEY = jax.random.key(0, impl="unsafe_rbg")
# Shared small networks: equal modules hash alike, so their compiled init / apply are reused.
MLP = mlp.MLP(hidden_dims=(16, 16), embedding_size=8, dropout=0.5)
UNET = unet.UNet(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.5)
UNET_SHAPE = (2, 8, 8, 1)


class _Fake(nn.Module):
  """out = w (x + [labels, 1]) for x of shape (B, 2); w a scalar parameter initialised to 1."""

  @nn.compact
  def __call__(self, x, labels, train=False):
    w = self.param("w", nn.initializers.ones, ())
    return w * (x + jnp.stack([labels, jnp.ones_like(labels)], axis=-1))


def _labels_and_factor(score_fn, t):
  """(labels the network saw, factor c with score = c * out), each (B,), from the score at x = 0."""
  s = np.asarray(score_fn(jnp.zeros((t.shape[0], 2)), t), np.float64)
  return s[:, 0] / s[:, 1], s[:, 1]


def _random_variables(model, shape, seed, scale=0.5):
  """Variables of ``model`` with N(0, scale^2) leaves (numpy, nothing to compile): O(1) outputs."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(scale * rng.normal(size=leaf.shape), jnp.float32),
                      wrapper.init_model(KEY, model, shape, shape_only=True))


@functools.cache
def _jit_apply(model):
  return jax.jit(model.apply, static_argnames="train")


def _apply(model, variables, x, labels, train=False, seed=0):
  """``model.apply`` with a dropout key, compiled once per (equal) module and mode."""
  key = jax.random.key(seed, impl="unsafe_rbg")
  return _jit_apply(model)(variables, x, labels, train=train, rngs={"dropout": key})


def _log_alpha(t, beta_min=0.1, beta_max=20.0):
  return -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min


# --- networks ------------------------------------------------------------------------------------


PLAIN_MLP = mlp.MLP(hidden_dims=(16, 8), residual=False, embedding_type="positional", embedding_size=8)


@pytest.mark.parametrize("model", [MLP, PLAIN_MLP], ids=["residual-fourier", "plain-positional"])
def test_mlp_shapes_and_near_zero_init(model):
  variables = wrapper.init_model(KEY, model, (5, 2))
  x = jax.random.normal(jax.random.key(1), (5, 2))
  out = _apply(model, variables, x, jnp.linspace(0.1, 999.0, 5))
  assert out.shape == (5, 2) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.max(np.abs(out)) < 1e-3  # Output layer initialised near zero.


@pytest.mark.slow
def test_unet_shapes_and_near_zero_init():
  # 8x8x1, initialised: the zero-initialised output conv gives ~0.
  variables = wrapper.init_model(KEY, UNET, UNET_SHAPE)
  out = _apply(UNET, variables, jax.random.uniform(jax.random.key(1), UNET_SHAPE), jnp.array([0.5, 10.0]))
  assert out.shape == UNET_SHAPE and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.max(np.abs(out)) < 1e-3
  # 16x16x3 with Fourier features and attention at full resolution, random weights.
  model = unet.UNet(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), embedding_type="fourier")
  shape = (2, 16, 16, 3)
  out = _apply(model, _random_variables(model, shape, 0, 0.2), jax.random.uniform(jax.random.key(1), shape),
               jnp.array([0.5, 10.0]))
  assert out.shape == shape and out.dtype == jnp.float32 and np.all(np.isfinite(out))


def test_unet_maps_uncentred_inputs_to_unit_interval():
  variables = _random_variables(UNET, UNET_SHAPE, 3)
  centred_net = UNET.clone(centered=True)
  x = jax.random.uniform(jax.random.key(1), UNET_SHAPE)
  labels = jnp.array([3.0, 7.0])
  uncentred = _apply(UNET, variables, x, labels)
  centred = _apply(centred_net, variables, 2.0 * x - 1.0, labels)
  np.testing.assert_allclose(uncentred, centred, rtol=1e-4, atol=1e-4)
  assert not np.allclose(uncentred, _apply(centred_net, variables, x, labels), atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("model,shape", [(MLP, (64, 2)), (UNET, UNET_SHAPE)], ids=["mlp", "unet"])
def test_dropout_only_in_train_mode(model, shape):
  variables = _random_variables(model, shape, 3)
  x = jax.random.uniform(jax.random.key(1), shape)
  labels = jnp.full(shape[:1], 0.5)
  evals = [_apply(model, variables, x, labels, train=False, seed=i) for i in (4, 5)]
  trains = [_apply(model, variables, x, labels, train=True, seed=i) for i in (4, 5)]
  np.testing.assert_array_equal(evals[0], evals[1])
  assert not np.allclose(trains[0], trains[1], atol=1e-3)
  assert not np.allclose(trains[0], evals[0], atol=1e-3)


def test_fourier_frequencies_are_frozen():
  variables = wrapper.init_model(KEY, MLP, (4, 2))
  w = variables["params"]["NoiseLabelEmbedding_0"]["GaussianFourierProjection_0"]["W"]
  assert w.shape == (8,) and 6.0 < np.std(w) < 40.0  # W ~ N(0, 16^2)

  def loss(params):
    return jnp.sum(MLP.apply({"params": params}, jnp.ones((4, 2)), jnp.full((4,), 3.0)) ** 2)

  grads = jax.jit(jax.grad(loss))(_random_variables(MLP, (4, 2), 3)["params"])
  assert np.all(grads["NoiseLabelEmbedding_0"]["GaussianFourierProjection_0"]["W"] == 0)
  assert np.any(grads["NoiseLabelEmbedding_0"]["Dense_0"]["kernel"] != 0)


def test_bad_network_options_raise():
  with pytest.raises(ValueError, match="divisible by 4"):
    wrapper.init_model(KEY, unet.UNet(nf=8, ch_mult=(1, 2, 2)), (1, 6, 6, 1), shape_only=True)
  with pytest.raises(ValueError, match="valid choices"):
    wrapper.init_model(KEY, mlp.MLP(embedding_type="learned"), (1, 2), shape_only=True)


@pytest.mark.parametrize("channels,groups", [(3, 1), (16, 4), (18, 3), (64, 16), (128, 32), (256, 32)])
def test_group_count_divides_channels(channels, groups):
  assert layers.num_groups(channels) == groups


@pytest.mark.slow
@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 12), 3), ((3, 4, 5, 6, 32), 32), ((2, 10, 16), 4), ((4, 8), 2)])
def test_group_norm_matches_the_grouped_statistics(shape, groups):
  """Against float64 statistics over the grouped axes; gradients against flax's GroupNorm."""
  x = 3.0 * jax.random.normal(jax.random.key(1), shape) + 2.0
  norm = layers.GroupNorm(num_groups=groups)
  variables = jax.eval_shape(norm.init, KEY, x)
  assert jax.tree.map(jnp.shape, variables) == {"params": {"scale": (shape[-1],), "bias": (shape[-1],)}}
  params = {"scale": 1.0 + jax.random.normal(jax.random.key(2), (shape[-1],)),
            "bias": jax.random.normal(jax.random.key(3), (shape[-1],))}
  x64 = np.asarray(x, np.float64).reshape(shape[0], -1, groups, shape[-1] // groups)
  mean, var = x64.mean(axis=(1, 3), keepdims=True), x64.var(axis=(1, 3), keepdims=True)
  expected = ((x64 - mean) / np.sqrt(var + 1e-6)).reshape(shape) * np.asarray(params["scale"]) + np.asarray(params["bias"])
  out = jax.jit(norm.apply)({"params": params}, x)
  assert out.dtype == jnp.float32
  # float32 sums of at most 1,600 terms of size ~5: a few units of float32 round-off, relative.
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  reference = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False)
  weights = jax.random.normal(jax.random.key(4), shape)
  grads = [jax.jit(jax.grad(lambda p, x, m=m: jnp.sum(jnp.tanh(m.apply({"params": p}, x)) * weights),
                            argnums=(0, 1)))(params, x) for m in (norm, reference)]
  for ours, theirs in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(theirs))))


def test_group_norm_dtype_and_errors():
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
  norm = layers.GroupNorm(num_groups=4, dtype=jnp.bfloat16)
  params = norm.init(KEY, x)
  out = norm.apply(params, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), layers.GroupNorm(num_groups=4).apply(params, x),
                             atol=2.0 ** -7 * 4)  # bfloat16 input and output: 8-bit mantissas, |y| < 4
  with pytest.raises(ValueError, match="divisible by 3"):
    layers.GroupNorm(num_groups=3).init(KEY, x)


# --- name table -------------------------------------------------------------------------------------


def test_get_model_passes_config_fields():
  config = default.get_default_configs()
  config.model.ch_mult = [1, 2]  # A list from the command line still gives a hashable module.
  config.data.centered = True
  model = models.get_model(config)
  assert isinstance(model, unet.UNet) and model.nf == config.model.nf and model.centered
  assert model.ch_mult == (1, 2) and hash(model) == hash(models.get_model(config))
  config.model.name = "MLP"
  model = models.get_model(config)
  assert isinstance(model, mlp.MLP) and model.hidden_dims == tuple(config.model.hidden_dims)
  assert model.dropout == config.model.dropout


def test_get_model_rejects_unknown_names():
  config = default.get_default_configs()
  config.model.name = "ncsnpp_typo"
  with pytest.raises(ValueError, match=re.escape(f"valid choices: {sorted(models.MODELS)}")):
    models.get_model(config)


def test_count_params():
  tree = {"params": {"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros(5)}}}
  assert wrapper.count_params(tree) == 17
  shapes = wrapper.init_model(KEY, MLP, (3, 2), shape_only=True)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))
  assert wrapper.count_params(shapes) == wrapper.count_params(wrapper.init_model(KEY, MLP, (5, 2))) > 0


# --- score parameterisation -------------------------------------------------------------------------


def _fake_score_fn(sde, continuous):
  variables = wrapper.init_model(KEY, _Fake(), (1, 2))
  return wrapper.get_score_fn(sde, _Fake(), variables, continuous=continuous)


T_CONT = jnp.array([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0], jnp.float32)


def test_vp_continuous_predicts_noise():
  labels, c = _labels_and_factor(_fake_score_fn(sde_lib.VPSDE(), True), T_CONT)
  t = np.asarray(T_CONT, np.float64)
  np.testing.assert_allclose(labels, 999.0 * t, rtol=1e-5)
  np.testing.assert_allclose(c, -1.0 / np.sqrt(1.0 - np.exp(2 * _log_alpha(t))), rtol=1e-4)


def test_subvp_continuous_predicts_noise():
  labels, c = _labels_and_factor(_fake_score_fn(sde_lib.SubVPSDE(), True), T_CONT)
  t = np.asarray(T_CONT, np.float64)
  np.testing.assert_allclose(labels, 999.0 * t, rtol=1e-5)
  np.testing.assert_allclose(c, -1.0 / (1.0 - np.exp(2 * _log_alpha(t))), rtol=1e-4)


def test_vp_discrete_uses_ddpm_table_at_rounded_index():
  n = 1000
  sde = sde_lib.VPSDE(N=n)
  i = np.arange(n)
  t = jnp.arange(n) / (n - 1)  # The times at which the discrete losses call the score.
  # Guard: float32 t (N - 1) falls just below i for many i, where truncation would pick level i - 1.
  assert np.sum(np.asarray(t * (n - 1)) < i) > 10
  labels, c = _labels_and_factor(_fake_score_fn(sde, False), t)
  np.testing.assert_allclose(labels, i, rtol=1e-5, atol=1e-4)
  alphas_cumprod = np.cumprod(1.0 - np.linspace(0.1 / n, 20.0 / n, n))
  np.testing.assert_allclose(c, -1.0 / np.sqrt(1.0 - alphas_cumprod), rtol=1e-5)


def test_ve_continuous_conditions_on_sigma():
  labels, c = _labels_and_factor(_fake_score_fn(sde_lib.VESDE(), True), T_CONT)
  sigma = 0.01 * (50.0 / 0.01) ** np.asarray(T_CONT, np.float64)
  np.testing.assert_allclose(labels, sigma, rtol=1e-5)
  np.testing.assert_allclose(c, 1.0, rtol=1e-6)


def test_ve_discrete_labels_index_descending_sigmas():
  n = 1000
  sde = sde_lib.VESDE(N=n)
  t = jnp.arange(n) / (n - 1)
  labels, c = _labels_and_factor(_fake_score_fn(sde, False), t)
  sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), n))  # Ascending in t, as VESDE stores them.
  np.testing.assert_allclose(labels, n - 1 - np.arange(n), rtol=1e-5, atol=1e-4)
  assert np.all(labels == np.round(labels))  # c = 1: the labels come back exactly, and are whole numbers.
  index = np.round(labels).astype(int)
  np.testing.assert_array_equal(sigmas[::-1][index], sigmas)  # sigma_desc[label_i] = sigma(t_i)
  np.testing.assert_allclose(c, 1.0, rtol=1e-6)


def test_ve_output_is_the_score_unchanged():
  x = jax.random.normal(jax.random.key(1), (6, 2))
  score = _fake_score_fn(sde_lib.VESDE(), True)(x, T_CONT)
  sigma = 0.01 * (50.0 / 0.01) ** T_CONT
  np.testing.assert_allclose(score, x + jnp.stack([sigma, jnp.ones_like(sigma)], -1), rtol=1e-5)


def test_parameterisation_errors_and_subclasses():
  with pytest.raises(ValueError, match="continuous=True"):
    _fake_score_fn(sde_lib.SubVPSDE(), False)
  # A network that divides by sigma itself must be a VE network wrapped as it was built.
  scaled = ncsnpp.NCSNpp(scale_by_sigma=True, continuous=True, embedding_type="positional")
  with pytest.raises(ValueError, match="scale_by_sigma=False"):
    wrapper.get_score_fn(sde_lib.VPSDE(), scaled, {"params": {}}, continuous=True)
  with pytest.raises(ValueError, match="continuous=False"):
    wrapper.get_score_fn(sde_lib.VESDE(), scaled, {"params": {}}, continuous=False)
  wrapper.get_score_fn(sde_lib.VESDE(), scaled, {"params": {}}, continuous=True)
  with pytest.raises(ValueError, match="positional"):  # Fourier features of log(label); labels reach 0.
    wrapper.get_score_fn(sde_lib.VESDE(), MLP, {"params": {}}, continuous=False)
  wrapper.get_score_fn(sde_lib.VESDE(), PLAIN_MLP, {"params": {}}, continuous=False)
  with pytest.raises(ValueError, match="supported SDEs"):
    wrapper.get_parameterisation(object())

  class MyVE(sde_lib.VESDE):
    pass

  assert wrapper.get_parameterisation(MyVE()) is wrapper.PARAMETERISATIONS[sde_lib.VESDE]


# --- score-function objects -------------------------------------------------------------------------


def test_builder_takes_params_and_drives_losses():
  sde = sde_lib.VPSDE()
  variables = wrapper.init_model(KEY, _Fake(), (1, 2))
  build = wrapper.get_score_fn_builder(sde, _Fake(), continuous=True, variables=variables)
  t = jnp.array([0.3, 0.7])
  base = build(variables["params"], None, False)(jnp.zeros((2, 2)), t)
  doubled = build({"w": jnp.array(2.0)}, None, False)(jnp.zeros((2, 2)), t)
  np.testing.assert_allclose(doubled, 2.0 * base, rtol=1e-6)
  with pytest.raises(ValueError, match=r"variables\['params'\]"):
    build(variables, None, False)
  with pytest.raises(ValueError, match="key"):
    wrapper.get_score_fn(sde, _Fake(), variables, continuous=True, train=True)
  # The losses take the builder and differentiate through it, with dropout on.
  params = wrapper.init_model(KEY, MLP, (5, 2))["params"]
  loss_fn = losses.get_loss_fn(sde, wrapper.get_score_fn_builder(sde, MLP, continuous=True), train=True)
  value_and_grad = jax.jit(jax.value_and_grad(lambda p: loss_fn(jax.random.key(2), p, jnp.ones((8, 2)))[0]))
  loss, grads = value_and_grad(params)
  assert np.isfinite(loss) and wrapper.count_params(grads) == wrapper.count_params(params)
  assert np.any(grads["Dense_1"]["kernel"] != 0)  # The output layer.


def test_score_function_is_a_pytree_that_does_not_retrace():
  sde = sde_lib.VESDE()
  traces = []

  @jax.jit
  def apply(score_fn, x, t):
    traces.append(None)  # Runs once per trace, not per call.
    return score_fn(x, t)

  def make(seed):  # A fresh (equal) module each time, as a reloaded config would build.
    model = MLP.clone()
    return wrapper.get_score_fn(sde, model, _random_variables(model, (4, 2), seed), continuous=True)

  x, t = jnp.ones((4, 2)), jnp.full((4,), 0.5)
  first, second = make(1), make(2)
  assert jax.tree.structure(first) == jax.tree.structure(second)
  out_first, out_second = apply(first, x, t), apply(second, x, t)
  assert len(traces) == 1
  assert not np.allclose(out_first, out_second)  # The new parameters were used, not baked in.
  np.testing.assert_allclose(out_first, first(x, t), rtol=1e-5, atol=1e-6)
  apply(first.replace(variables=second.variables), x, t)
  assert len(traces) == 1
