"""Guidance against closed form, class-conditional networks, label dropout, and the errors that say what to set.

Ground truth. For a Gaussian mixture p_0 = sum_k w_k N(mu_k, Sigma_k) labelled by its component,
p_t(x | y = k) is component k diffused alone, so s(x, t | k) is that component's score, and the
exact noise-conditional classifier has logits log w_k + log N_k(x) (``component_logits``): its
softmax is the posterior responsibility p_t(k | x). Classifier guidance with scale 1 must then
return the component's score, and classifier-free guidance with the exact conditional and
unconditional scores must satisfy its defining combination.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import default_toy
from score_sde import datasets
from score_sde import guidance
from score_sde import losses
from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde import builders
from score_sde.models import mlp
from score_sde.models import unet
from score_sde.models import wrapper
from tests import stats
from tests import helpers

SDES = helpers.SDES
MIXTURE = datasets.toy_density("mixture")  # three anisotropic components in 2-D
K = MIXTURE.num_components
EPS32 = float(np.finfo(np.float32).eps)


def _logits(sde, mixture, x, t):
  return mixture.component_logits(x, t, sde)


# One function object per SDE, so the exact classifier is a pytree with the mixture as its leaves.
LOGITS = {name: functools.partial(_logits, sde) for name, sde in SDES.items()}


def exact_logit_fn(name):
  return jax.tree_util.Partial(LOGITS[name], MIXTURE)


def component_scores(sde, x, t):
  """(K, B, D): the score of each component alone, s(x, t | k)."""
  return jnp.stack([MIXTURE.component(k).score(x, t, sde) for k in range(K)])


def points(n=96, seed=0):
  """Points spread over the data's range at times from near 0 to T, and labels cycling over the components."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(1.5 * rng.standard_normal((n, 2)), jnp.float32)
  return x, jnp.asarray(rng.uniform(0.02, 1.0, n), jnp.float32), jnp.arange(n) % K


@functools.partial(jax.jit, static_argnums=0)
def guided_and_exact(sde, guided, x, t):
  """The guided score and the exact scores at (x, t): per component (K, B, D) and of the mixture (B, D)."""
  return guided(x, t), component_scores(sde, x, t), MIXTURE.score(x, t, sde)


# --- Closed form -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SDES))
def test_classifier_guidance_with_scale_one_is_the_component_score(name):
  sde = SDES[name]
  x, t, y = points()
  for scale in (1.0, 0.0, 2.0):  # 1: the component; 0: unconditional; the term is linear in the scale
    guided = guidance.classifier_guided_score(MIXTURE.score_fn(sde), exact_logit_fn(name), y, scale=scale)
    got, per_component, s = guided_and_exact(sde, guided, x, t)  # one compilation: the scale is a leaf
    want = per_component[y, jnp.arange(len(y))]
    # s + grad log p(y|x) = s + (s_y - s): float32 rounding of terms as large as the largest
    # component score, a few dozen roundings deep (eigenbasis products, logsumexp and its gradient).
    size = np.asarray(jnp.max(jnp.abs(per_component), axis=0) + jnp.abs(s))
    np.testing.assert_array_less(np.abs(got - (scale * want + (1 - scale) * s)), 64 * (1 + scale) * EPS32 * size)


CALLS = []  # batch sizes of the calls of the exact conditional score, recorded as it is traced


def _exact_conditional(x, t, y):
  """Component y's score, or the mixture's for the null label K (the VP SDE)."""
  CALLS.append(x.shape[0])
  sde = SDES["vp"]
  s_y = component_scores(sde, x, t)[jnp.minimum(y, K - 1), jnp.arange(x.shape[0])]
  return jnp.where((y == K)[:, None], MIXTURE.score(x, t, sde), s_y)


def test_classifier_free_guidance_combines_conditional_and_unconditional_scores():
  sde = SDES["vp"]
  x, t, y = points()
  cond = jax.tree_util.Partial(_exact_conditional)
  # w = 0 is the conditional model; w: (1 + w) s(x|y) - w s(x), per sample too; w = -1 unconditional.
  CALLS.clear()
  for w in (jnp.zeros(len(y)), jnp.linspace(-1.0, 3.0, len(y))):  # one compilation: w is a leaf
    guided = guidance.classifier_free_guided_score(cond, y, w, null_label=K)
    got, per_component, s_uncond = guided_and_exact(sde, guided, x, t)
    s_cond = per_component[y, jnp.arange(len(y))]
    w = w[:, None]
    bound = 8 * EPS32 * (1 + jnp.abs(w)) * (jnp.abs(s_cond) + jnp.abs(s_uncond))
    np.testing.assert_array_less(np.abs(got - ((1 + w) * s_cond - w * s_uncond)), np.asarray(bound))
  # One call of the conditional score per evaluation, on the doubled batch [x; x] (once per trace).
  assert CALLS == [2 * len(y)]


# Sampling one component with classifier guidance: 1000 samples from second-order DPM-Solver with 20
# score evaluations (a sampler that compiles in seconds; any sampler takes the guided score). Its
# energy distance to exact samples of the component measured 3e-4 (two seeds, n = 2000), within the
# exact-vs-exact spread; the threshold is the 1% null quantile at n = 1000 (~6e-3).
N, NFE = 1000, 20


@pytest.mark.slow
def test_classifier_guided_sampling_follows_the_labelled_component():
  sde, label = SDES["vp"], 2   # the lightest component (weight 0.2): unguided, 80% of samples miss it
  guided = guidance.classifier_guided_score(MIXTURE.score_fn(sde), exact_logit_fn("vp"), np.full(N, label), 1.0)
  sampler = sampling.get_sampler(sde, (N, 2), method="dpm_solver", nfe=NFE, order=2)
  samples, nfe = jax.jit(sampler)(jax.random.key(0), guided)
  assert int(nfe) == NFE and np.all(np.isfinite(samples))
  component = MIXTURE.component(label)
  exact_n = jax.jit(lambda key: component.sample(key, N))
  exact = lambda key, n: exact_n(key)
  threshold = stats.null_threshold(exact, N, quantile=0.99)
  assert float(stats.energy_distance(samples, exact(jax.random.key(1), N))) < threshold
  # The check can fail: the whole mixture's exact samples are far from the component.
  assert float(stats.energy_distance(MIXTURE.sample(jax.random.key(2), N), exact(jax.random.key(1), N))) > \
    10 * threshold


# --- Class-conditional networks ------------------------------------------------------------------------


def param_shapes(model, shape):
  variables = wrapper.init_model(jax.random.key(0), model, shape, shape_only=True)
  return jax.tree.map(lambda a: a.shape, variables["params"])


@pytest.mark.parametrize("model, shape, width", [
    (mlp.MLP(hidden_dims=(16, 16), embedding_size=8), (2, 2), 32),
    (unet.UNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()), (2, 8, 8, 1), 32)])
def test_num_classes_adds_only_the_class_table(model, shape, width):
  plain = param_shapes(model, shape)
  assert param_shapes(model.clone(num_classes=0), shape) == plain
  assert not any("ClassLabelEmbedding" in name for name in plain)
  conditional = dict(param_shapes(model.clone(num_classes=5), shape))
  assert conditional.pop("ClassLabelEmbedding_0") == {"Embed_0": {"embedding": (6, width)}}  # 5 classes + null
  assert conditional == plain
  assert wrapper.num_classes_of(model.clone(num_classes=5)) == 5 and wrapper.num_classes_of(model) == 0


@functools.cache
def tiny_conditional():
  """The VP SDE and a small 3-class MLP with random parameters (numpy draws: nothing to compile)."""
  model = mlp.MLP(hidden_dims=(16, 16), embedding_size=8, num_classes=3)
  shapes = wrapper.init_model(jax.random.key(0), model, (1, 2), shape_only=True)["params"]
  rng = np.random.default_rng(0)
  return SDES["vp"], model, jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), shapes)


def test_class_labels_condition_the_score_and_none_is_the_null_class():
  sde, model, params = tiny_conditional()
  x, t = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2)), jnp.float32), jnp.full((4,), 0.5)
  fn = wrapper.get_score_fn(sde, model, {"params": params}, continuous=True)
  bound = wrapper.get_score_fn(sde, model, {"params": params}, continuous=True, class_labels=[0, 1, 2, 0])

  @jax.jit
  def scores(fn, bound):
    null = jnp.full((4,), 3)
    return (fn(x, t), fn(x, t, null), fn.replace(class_labels=null)(x, t), bound(x, t),
            fn(x, t, jnp.array([0, 1, 2, 0])), fn(x, t, jnp.array([0, 4, -1, 3])))

  unconditional, null, bound_null, conditional, given, bad = scores(fn, bound)
  np.testing.assert_allclose(null, unconditional, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(bound_null, unconditional, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(conditional, given, rtol=1e-6, atol=1e-6)
  assert np.min(np.abs(conditional - unconditional)) > 1e-3
  # Labels outside [0, C] inside a trace embed as NaN, never as another class.
  assert np.isfinite(bad[0]).all() and np.isnan(bad[1:3]).all() and np.isfinite(bad[3]).all()


def test_label_dropout_one_is_the_unconditional_loss():
  sde, model, params = tiny_conditional()
  builder = wrapper.get_score_fn_builder(sde, model, continuous=True)
  make = lambda b: losses.get_loss_fn(sde, b, train=False, reduce_mean=True)
  loss = lambda dropout: losses.get_class_conditional_loss_fn(make, builder, num_classes=3, label_dropout=dropout)
  batch = {"image": jnp.asarray(np.random.default_rng(2).standard_normal((64, 2)), jnp.float32),
           "label": jnp.arange(64) % 3}
  key = jax.random.key(3)

  @jax.jit
  def losses_of(params):
    _, k_loss = jax.random.split(key)
    unconditional = make(builder)(k_loss, params, batch["image"])[0]  # no labels: the null class
    bad = {**batch, "label": batch["label"].at[0].set(3)}
    return (unconditional, loss(1.0)(key, params, batch)[0], loss(0.0)(key, params, batch)[0],
            loss(0.0)(key, params, bad)[0])

  unconditional, dropped, kept, bad = losses_of(params)
  np.testing.assert_allclose(dropped, unconditional, rtol=1e-6)
  assert abs(float(kept) - float(unconditional)) > 1e-3 * float(unconditional)
  assert np.isnan(float(bad))  # a label outside the classes makes the loss NaN


# --- Bad input ----------------------------------------------------------------------------------------


def test_bad_labels_are_refused_with_the_valid_range():
  sde, model, params = tiny_conditional()
  with pytest.raises(ValueError, match=r"must lie in \[0, 3\]"):
    wrapper.get_score_fn(sde, model, {"params": params}, continuous=True, class_labels=[0, 4])
  with pytest.raises(ValueError, match="model.num_classes"):
    wrapper.get_score_fn(sde, model.clone(num_classes=0), {"params": params}, continuous=True, class_labels=[0])
  with pytest.raises(ValueError, match=r"\[0, null_label=3\)"):
    guidance.classifier_free_guided_score(lambda x, t, y: x, [0, 3], 1.0, null_label=3)
  with pytest.raises(ValueError, match="non-negative integers"):
    guidance.classifier_guided_score(lambda x, t: x, lambda x, t: x, [0.5], 1.0)
  guided = guidance.classifier_guided_score(lambda x, t: x, lambda x, t: x, [0, 1], 1.0)
  with pytest.raises(ValueError, match="one label per sample"):
    guided(jnp.zeros((3, 2)), jnp.ones(3))


def cfg_config(**sampling):
  config = default_toy.get_default_configs()
  config.model.num_classes = 8
  config.sampling.update(sampling)
  return config


def test_sampling_config_errors_name_the_key_to_set(tmp_path):
  unconditional = cfg_config(guidance="classifier_free")
  unconditional.model.num_classes = 0
  with pytest.raises(ValueError, match="config.model.num_classes"):
    builders.validate(unconditional)
  with pytest.raises(ValueError, match="config.sampling.classifier_workdir"):
    builders.validate(cfg_config(guidance="classifier"))
  with pytest.raises(ValueError, match="sampling.class_labels"):
    builders.validate(cfg_config(guidance="classifier_free", class_labels=(1, 8)))
  with pytest.raises(ValueError, match="sampling.guidance"):
    builders.validate(cfg_config(guidance="cfg"))
  bad_dropout = cfg_config()
  bad_dropout.training.label_dropout = 1.5
  with pytest.raises(ValueError, match="training.label_dropout"):
    builders.validate(bad_dropout)
  # A classifier workdir without a classifier run, then without a checkpoint.
  config = cfg_config(guidance="classifier", classifier_workdir=str(tmp_path))
  restored = builders.Restored(sde=sde_lib.VPSDE(), network=mlp.MLP(num_classes=8), fn=None, step=0)
  with pytest.raises(FileNotFoundError, match="holds no config.json"):
    builders.build_guided_score_fns(config, restored)
  classifier_config = default.get_default_configs()
  classifier_config.training.objective = "classifier"
  classifier_config.data.update(dataset="8gaussians", image_size=0, num_channels=0)
  (tmp_path / "config.json").write_text(classifier_config.to_json_best_effort())
  with pytest.raises(FileNotFoundError, match="No classifier checkpoint in config.sampling.classifier_workdir"):
    builders.build_guided_score_fns(config, restored)
  classifier_config.training.sde = "vesde"
  (tmp_path / "config.json").write_text(classifier_config.to_json_best_effort())
  with pytest.raises(ValueError, match="training.sde"):
    builders.build_guided_score_fns(config, restored)
