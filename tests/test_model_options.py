"""Memory and speed options of the networks: ``remat`` and ``dtype`` (``config.model``).

Rematerialisation must change nothing but the schedule of the backward pass: same parameter tree,
same outputs and gradients. bfloat16 compute must keep float32 parameters (so checkpoints are
interchangeable) and a float32 output, and stay within what bfloat16 round-off allows: its unit
round-off is 2^-9, so a few dozen layers in sequence stay well within 2^-4 relative error.
Normalisation statistics, softmax and average pooling stay float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from score_sde import models
from score_sde.models import ddpm, ncsnpp, ncsnv2, unet, wrapper

SHAPE = (2, 8, 8, 3)
LABELS = jnp.asarray([0.3, 2.0])  # positive: valid continuous labels for Fourier and sinusoidal embeddings
# Tiny DDPM++ (BigGAN blocks, positional embedding, skip rescaling), NCSN++ (FIR, residual input
# pyramid, Fourier features, sigma scaling) and DDPM (32-group GroupNorm, NIN shortcuts).
# NCSN++ with num_res_blocks=0 keeps one block per level on the way up, the resampling blocks and
# the middle: all the kinds of block, in few operations (fast to compile). Tiny NCSNv2 (InstanceNorm++,
# half-pixel bilinear fusion, max-pooling CRP, sigma scaling) and NCSN v1 (conditional InstanceNorm++,
# align-corners fusion, average-pooling CRP); LABELS round to the noise indices 0 and 2.
NETWORKS = {
    "ddpmpp": functools.partial(ncsnpp.NCSNpp, nf=8, ch_mult=(1, 2), num_res_blocks=0, attn_resolutions=(4,),
                                fir=False, progressive_input="none", embedding_type="positional", init_scale=0.5),
    "ncsnpp": functools.partial(ncsnpp.NCSNpp, nf=8, ch_mult=(1, 2), num_res_blocks=0, attn_resolutions=(4,),
                                init_scale=0.5, scale_by_sigma=True),
    "ddpm": functools.partial(ddpm.DDPM, nf=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,)),
    "unet": functools.partial(unet.UNet, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),
    "ncsnv2": functools.partial(ncsnv2.NCSNv2, nf=4),
    "ncsn": functools.partial(ncsnv2.NCSN, nf=4, interpolation="bilinear_align_corners"),
}
BF16_RELATIVE_ERROR = 2.0**-4


def _run(fn, *args):
  """fn(*args) compiled without XLA's backend optimisations (tiny networks compile faster)."""
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


@functools.cache
def _abstract_variables(model, shape=SHAPE):
  return wrapper.init_model(jax.random.key(0), model, shape, shape_only=True)


def _variables(model, shape=SHAPE, seed=0):
  """N(0, 0.3^2) parameters drawn in numpy (nothing to compile), so every layer matters."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype),
                      _abstract_variables(model, shape))


def _tree_signature(model, shape=SHAPE):
  """{path: (shape, dtype)} of the parameters, from shapes only."""
  return {jax.tree_util.keystr(path): (leaf.shape, leaf.dtype)
          for path, leaf in jax.tree_util.tree_leaves_with_path(_abstract_variables(model, shape))}


def _checkpointed_calls(model, variables, x, labels=LABELS):
  """Number of rematerialised calls in the program of ``model.apply``."""
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, labels))(variables, x)
  return sum(eqn.primitive.name in ("remat2", "checkpoint") for eqn in _equations(jaxpr.jaxpr))


def _outputs_and_grads(model, variables, x, train):
  """The output, and the gradients of <output, x> with respect to parameters and input, in one program."""
  rngs = {"dropout": jax.random.key(7)}

  def loss(v, x):
    out = model.apply(v, x, LABELS, train, rngs=rngs)
    return jnp.sum(out * x), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)
  return out, grads


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_options_keep_the_parameter_tree(name):
  reference = _tree_signature(NETWORKS[name]())
  assert all(dtype == jnp.float32 for _, dtype in reference.values())
  for options in ({"remat": True}, {"dtype": "bfloat16"}, {"remat": True, "dtype": "bfloat16"}):
    assert _tree_signature(NETWORKS[name](**options)) == reference, options


# Residual blocks + attention blocks of the tiny networks: DDPM++ 6 + 2 (attention in the middle
# and on the way up at 4 px), DDPM 5 + 1 (one level, attention in the middle only).
@pytest.mark.slow
@pytest.mark.parametrize("name, blocks", [("ddpmpp", 8), ("ddpm", 6)])
def test_remat_gives_the_same_outputs_and_gradients(name, blocks):
  # In training mode with dropout: the static ``train`` argument and the dropout masks get through.
  plain, remat = NETWORKS[name](dropout=0.5), NETWORKS[name](dropout=0.5, remat=True)
  variables = _variables(plain)
  x = jax.random.uniform(jax.random.key(1), SHAPE)
  # Rematerialisation is really there: one checkpointed call per block.
  assert (_checkpointed_calls(plain, variables, x), _checkpointed_calls(remat, variables, x)) == (0, blocks)
  both = _run(lambda v, x: (_outputs_and_grads(plain, v, x, True), _outputs_and_grads(remat, v, x, True)),
              variables, x)
  (out, grads), (out_remat, grads_remat) = jax.tree.map(np.asarray, both)
  assert np.abs(out).mean() > 1e-2  # a network that computes something
  np.testing.assert_allclose(out_remat, out, rtol=1e-5, atol=1e-5 * np.abs(out).max())
  # Relative to the largest gradient: some (biases before a GroupNorm) are zero up to round-off.
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads))
  for g_remat, g in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_remat, g, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ncsnpp", "ddpm", "ncsnv2", "ncsn"])
def test_bfloat16_computes_in_bfloat16_and_returns_float32(name):
  plain, half = NETWORKS[name](), NETWORKS[name](dtype="bfloat16")
  variables = _variables(plain)
  x = jax.random.uniform(jax.random.key(1), SHAPE)
  # Every convolution and matrix product of the bfloat16 network takes bfloat16 operands; the
  # statistics stay float32.
  assert _bfloat16_products(half, variables, x) and not _bfloat16_products(plain, variables, x)
  assert _float32_statistics(half, variables, x)
  out, out_half = map(np.asarray, _run(lambda v, x: (plain.apply(v, x, LABELS), half.apply(v, x, LABELS)),
                                       variables, x))
  assert out_half.dtype == np.float32 and out_half.shape == SHAPE
  error = np.linalg.norm(out_half - out) / np.linalg.norm(out)
  assert 0 < error < BF16_RELATIVE_ERROR, error


def _bfloat16_products(model, variables, x):
  """True if every convolution and matrix product of ``model.apply`` takes bfloat16 operands."""
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, LABELS))(variables, x)
  products = [eqn for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name in ("conv_general_dilated", "dot_general")]
  return bool(products) and all(v.aval.dtype == jnp.bfloat16 for eqn in products for v in eqn.invars)


def _float32_statistics(model, variables, x):
  """True if every sum and square root of ``model.apply`` takes float32 operands.

  Sums: means and variances, softmax normalisers, average pooling. Square roots: every normalisation
  divides by sqrt(variance + eps), which catches statistics that jnp's reductions summed in float32
  but rounded to bfloat16.
  """
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, LABELS))(variables, x)
  ops = [eqn for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name in ("reduce_sum", "reduce_window_sum", "sqrt",
                                                                          "rsqrt")]
  return bool(ops) and all(v.aval.dtype == jnp.float32 for eqn in ops for v in eqn.invars)


# Checked from shapes and programs only (nothing compiled): the U-Net, and the NCSNv2 sizes with the
# normalisations that NETWORKS' InstanceNorm++ leaves out. Rematerialised blocks: the U-Net's 8
# residual blocks (2 down, 2 middle, 4 up) and 4 attention blocks (1 down, 1 middle, 2 up at 4 px);
# NCSNv2's two residual blocks and one RefineBlock per stage (4, 5 and 6 stages).
@pytest.mark.parametrize("make, blocks", [
    (NETWORKS["unet"], 8 + 4),
    (functools.partial(ncsnv2.NCSNv2, nf=4, normalization="InstanceNorm"), 8 + 4),
    (functools.partial(ncsnv2.NCSNv2_128, nf=4, normalization="GroupNorm"), 10 + 5),
    (functools.partial(ncsnv2.NCSNv2_256, nf=4, normalization="VarianceNorm", interpolation="nearest_neighbor"),
     12 + 6),
], ids=["unet", "ncsnv2_64_instancenorm", "ncsnv2_128_groupnorm", "ncsnv2_256_variancenorm"])
@pytest.mark.slow
def test_options_change_the_program_not_the_output_type(make, blocks):
  plain, remat, half = make(), make(remat=True), make(dtype="bfloat16")
  variables = _abstract_variables(plain)
  x = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
  assert _tree_signature(remat) == _tree_signature(half) == _tree_signature(plain)
  for model in (plain, remat, half):
    out = jax.eval_shape(lambda v, x, m=model: m.apply(v, x, LABELS), variables, x)
    assert (out.shape, out.dtype) == (SHAPE, jnp.float32)
  assert _bfloat16_products(half, variables, x) and not _bfloat16_products(plain, variables, x)
  assert _float32_statistics(half, variables, x)
  assert (_checkpointed_calls(plain, variables, x), _checkpointed_calls(remat, variables, x)) == (0, blocks)


def _equations(jaxpr):
  """Every equation of a jaxpr, including those of nested jaxprs (pjit, remat, custom rules)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


def test_config_keys_reach_the_networks():
  config = default.get_default_configs()
  assert (config.model.remat, config.model.dtype) == (False, "float32")
  for name in ("ncsnpp", "ddpm", "unet", "ncsn", "ncsnv2_64", "ncsnv2_128", "ncsnv2_256"):
    config.model.name, config.model.remat, config.model.dtype = name, True, "bfloat16"
    model = models.get_model(config)
    assert (model.remat, model.dtype) == (True, "bfloat16")
  # The MLP has neither option, and refuses each rather than ignoring it.
  config.model.name, config.model.remat, config.model.dtype = "mlp", False, "bfloat16"
  with pytest.raises(ValueError, match="no dtype option"):
    models.get_model(config)
  config.model.remat, config.model.dtype = True, "float32"
  with pytest.raises(ValueError, match="no remat option"):
    models.get_model(config)


def test_unknown_dtype_raises():
  with pytest.raises(ValueError, match="valid choices"):
    _tree_signature(NETWORKS["ncsnpp"](dtype="float16"))


@pytest.mark.parametrize("cls", [ncsnv2.NCSNv2, ncsnv2.NCSN])
def test_ncsn_remat_keeps_the_parameters_and_checkpoints_every_block(cls):
  plain, remat = cls(nf=4), cls(nf=4, remat=True)
  shape = (2, 8, 8, 3)
  assert _tree_signature(remat, shape) == _tree_signature(plain, shape)
  variables = _variables(plain, shape)
  x, labels = jnp.zeros(shape), jnp.asarray([0.0, 1.0])
  # One checkpointed call for each of the eight residual blocks and four RefineBlocks.
  assert (_checkpointed_calls(plain, variables, x, labels), _checkpointed_calls(remat, variables, x, labels)) == (0, 12)
