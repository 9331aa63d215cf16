"""The paper's networks: parameter counts, parity with the reference implementation, every option, every config.

Parity uses the reference fixtures in ``../shared/fixtures`` (next to the repository): tiny
randomly initialised NCSN++ / DDPM++ / DDPM networks of the original's PyTorch port, with their
weights, inputs and outputs. Big networks are only traced (``jax.eval_shape``), never run.
"""

import functools
import importlib
import inspect
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import default
from score_sde import convert
from score_sde import models
from score_sde import sde as sde_lib
from score_sde.models import ddpm, layers, ncsnpp, up_or_down_sampling, wrapper

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("SCORE_SDE_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURE_CASES = ("ncsnpp_ve_fourier", "ncsnpp_ve_outputskip", "ddpmpp_vp_positional", "ddpm_vp_ch22")
KEY = jax.random.key(0)


def run(fn, *args):
  """fn(*args) compiled without XLA's backend optimisations: tiny networks compile about twice as fast."""
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def fixture_dir(case: str) -> pathlib.Path:
  """The folder of a reference fixture; skips the test when the fixtures are not there."""
  folder = FIXTURES / case
  if not (folder / "weights.npz").exists():
    pytest.skip(f"reference fixture {case!r} not found under {FIXTURES} (the shared fixtures folder next to the "
                f"repository, or $SCORE_SDE_FIXTURES)")
  return folder


def fixture_config(folder: pathlib.Path):
  """This framework's config for a fixture: the defaults overlaid with the fixture's resolved config."""
  reference = json.loads((folder / "config.json").read_text())["config"]
  config = default.get_default_configs()
  for section in ("data", "model", "training"):
    for key, value in reference[section].items():
      if key in config[section]:
        config[section][key] = tuple(value) if isinstance(value, list) else value
  return config


def load_fixture(case: str):
  """(config, model, io arrays, imported checkpoint) of a fixture."""
  folder = fixture_dir(case)
  config = fixture_config(folder)
  io = dict(np.load(folder / "io.npz"))
  model = models.get_model(config)
  ckpt = convert.load_checkpoint(folder / "weights.npz", model, io["x_nhwc"].shape)
  return config, model, io, ckpt


# --- parity with the reference implementation -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_reference_outputs_are_reproduced(case):
  config, model, io, ckpt = load_fixture(case)
  reference = json.loads((FIXTURES / case / "config.json").read_text())
  assert wrapper.count_params(ckpt.params) == reference["param_count"]
  out = np.asarray(run(model.apply, {"params": ckpt.params}, io["x_nhwc"], io["labels"]))
  ref = io["out_nhwc"]
  assert out.shape == ref.shape
  # Per sample: VE outputs are divided by sigma, so the two samples differ in scale by up to 32x.
  err = np.linalg.norm((out - ref).reshape(len(ref), -1), axis=1) / np.linalg.norm(ref.reshape(len(ref), -1), axis=1)
  assert np.all(err < 1e-5), err


# --- parameter counts ------------------------------------------------------------------------------

PAPER_COUNTS = {
    "configs.ve.cifar10_ncsnpp_continuous": 62_758_915,   # NCSN++ cont.
    "configs.vp.cifar10_ddpmpp_continuous": 61_804_419,   # DDPM++ cont.
    "configs.vp.ddpm.cifar10_continuous": 35_218_947,     # DDPM
}


def _abstract(config):
  """Traces the network of ``config`` on one example: (output ShapeDtypeStruct, abstract variables, input shape)."""
  size = config.data.image_size
  shape = (1, size, size, config.data.num_channels) if size else (1, 2)
  return (*_trace(models.get_model(config), shape), shape)


@functools.lru_cache(maxsize=None)
def _trace(model, shape):
  """(output, variables) of ``model`` on zeros of ``shape``, abstractly; configs that build equal networks share it."""
  labels = jnp.full((1,), 0.5 if getattr(model, "continuous", True) else 3.0)
  return jax.eval_shape(lambda k: model.init_with_output(k, jnp.zeros(shape), labels), KEY)


# Every config of a score model (modules of shared helpers have no get_config; configs/classifier/
# trains the guidance classifier, whose network is not config.model's).
CONFIGS = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts)
    for path in (REPO / "configs").rglob("*.py")
    if "def get_config(" in path.read_text() and path.parent.name != "classifier")


def test_the_paper_configs_are_shipped():
  assert set(PAPER_COUNTS) <= set(CONFIGS)
  paper = {"ve.cifar10_ncsnpp", "ve.cifar10_ncsnpp_continuous", "ve.cifar10_ncsnpp_deep_continuous", "ve.cifar10_ddpm",
           "ve.celeba_ncsnpp", "ve.bedroom_ncsnpp_continuous", "ve.church_ncsnpp_continuous",
           "ve.ffhq_256_ncsnpp_continuous", "ve.celebahq_256_ncsnpp_continuous", "ve.ffhq_ncsnpp_continuous",
           "ve.celebahq_ncsnpp_continuous", "vp.cifar10_ddpmpp", "vp.cifar10_ddpmpp_continuous",
           "vp.cifar10_ddpmpp_deep_continuous", "vp.cifar10_ncsnpp", "vp.cifar10_ncsnpp_continuous",
           "vp.cifar10_ncsnpp_deep_continuous", "vp.ddpm.cifar10", "vp.ddpm.cifar10_continuous",
           "vp.ddpm.cifar10_unconditional", "vp.ddpm.bedroom", "vp.ddpm.church", "vp.ddpm.celebahq",
           "subvp.cifar10_ddpm_continuous", "subvp.cifar10_ddpmpp_continuous", "subvp.cifar10_ddpmpp_deep_continuous",
           "subvp.cifar10_ncsnpp_continuous", "subvp.cifar10_ncsnpp_deep_continuous"}
  assert {f"configs.{name}" for name in paper} <= set(CONFIGS)


def _keys(config, prefix=""):
  """The dotted names of every field of a ConfigDict."""
  return set().union(*({f"{prefix}{k}"} if not hasattr(v, "items") else _keys(v, f"{prefix}{k}.")
                       for k, v in config.items()))


# The original's counts of its other networks (millions, two decimals).
ORIGINAL_MILLIONS = {
    "configs.ve.cifar10_ncsnpp_deep_continuous": 107.59, "configs.vp.cifar10_ddpmpp_deep_continuous": 106.63,
    "configs.ve.bedroom_ncsnpp_continuous": 65.57, "configs.ve.ffhq_ncsnpp_continuous": 105.79,
    "configs.vp.ddpm.bedroom": 111.57, "configs.vp.ddpm.cifar10_unconditional": 32.33,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_its_model(name):
  config = importlib.import_module(name).get_config()
  # No undeclared key: the original's typos (training.loss for training.sde, training.continuouse) silently
  # added new fields and left the intended ones at their defaults.
  assert _keys(config) <= _keys(default.get_default_configs())
  # (tests/test_configs.py validates every config: names, frequencies, batch sizes.)
  sde_name = config.training.sde.lower()
  sde_args = inspect.signature(sde_lib.SDES[sde_name]).parameters
  sde_lib.get_sde(sde_name, N=config.model.num_scales,
                  **{k: config.model[k] for k in sde_args if k != "N" and k in config.model})
  out, variables, shape = _abstract(config)
  assert out.shape == shape
  count = wrapper.count_params(variables)
  assert count > 0
  if name in PAPER_COUNTS:
    assert count == PAPER_COUNTS[name]
  if name in ORIGINAL_MILLIONS:
    assert round(count / 1e6, 2) == ORIGINAL_MILLIONS[name]
  if config.model.name in ("ncsnpp", "ddpm"):
    # VE networks output the score (divided by sigma); VP / subVP networks predict noise.
    assert config.model.scale_by_sigma == (config.training.sde == "vesde")
    assert config.data.centered == (config.training.sde != "vesde")


# --- every option of NCSN++ ----------------------------------------------------------------------------

TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
VARIANTS = {
    "ddpm_blocks_fir": dict(resblock_type="ddpm", fir=True, progressive="residual", progressive_input="residual"),
    "ddpm_blocks_plain": dict(resblock_type="ddpm", fir=False, resamp_with_conv=False, progressive="output_skip",
                              progressive_input="input_skip", embedding_type="positional"),
    "ddpm_blocks_conv": dict(resblock_type="ddpm", fir=False, progressive="residual", progressive_input="none"),
    "biggan_cat": dict(progressive="output_skip", progressive_input="input_skip", progressive_combine="cat"),
    "biggan_residual_nofir": dict(fir=False, progressive="residual", progressive_input="residual",
                                  skip_rescale=False),
    "unconditional_centered": dict(conditional=False, centered=True, nonlinearity="elu", init_scale=1.0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_option_builds_and_maps_to_the_port(variant):
  model = ncsnpp.NCSNpp(**TINY, **VARIANTS[variant])
  shape = (2, 8, 8, 3)
  out, variables = jax.eval_shape(lambda k: model.init_with_output(k, jnp.zeros(shape), jnp.ones(2)), KEY)
  assert out.shape == shape
  # Every parameter has a name in the port's module list, and the port's layout lists no layer twice.
  order = convert.torch_layout(model, shape[1])
  assert len(order) == len(set(order))
  assert set(variables["params"]) <= set(order)
  names = convert.params_to_torch_state_dict(
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), variables["params"]), model, shape)
  assert len(names) == len(jax.tree.leaves(variables)) + 1  # + the sigmas buffer


def test_options_change_the_network():
  def params(**kwargs):
    _, variables = jax.eval_shape(
        lambda k: ncsnpp.NCSNpp(**TINY, **kwargs).init_with_output(k, jnp.zeros((1, 8, 8, 3)), jnp.ones(1)), KEY)
    return {"/".join(str(getattr(p, "key", p)) for p in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])}
  base = params()
  assert "Downsample_0/Conv2d_0/weight" in base  # FIR residual input pyramid
  assert params(conditional=False).keys() == {k for k in base if "Dense_" not in k}
  assert "Combine_0/Conv_0/kernel" in params(progressive_input="input_skip")
  # cat doubles the channels that the block after the first merge receives.
  assert params(progressive_input="input_skip", progressive_combine="cat")["ResnetBlockBigGANpp_2/Conv_0/kernel"][2] \
      == 2 * params(progressive_input="input_skip")["ResnetBlockBigGANpp_2/Conv_0/kernel"][2]
  assert "Downsample_0/Conv_0/kernel" in params(fir=False)
  assert "Dense_0/kernel" in params(embedding_type="positional") and "GaussianFourierProjection_0/W" not in params(
      embedding_type="positional")
  assert "ResnetBlockDDPMpp_0/Conv_0/kernel" in params(resblock_type="ddpm")


@pytest.mark.parametrize("kwargs, match", [
    (dict(resblock_type="resnet"), r"resblock_type 'resnet'; valid choices: \['ddpm', 'biggan'\]"),
    (dict(progressive="skip"), "valid choices"),
    (dict(progressive_input="skip"), "valid choices"),
    (dict(progressive_combine="mean"), "valid choices"),
    (dict(embedding_type="learned"), "valid choices"),
    (dict(embedding_type="fourier", continuous=False), "positional"),
])
def test_invalid_options_raise(kwargs, match):
  model = ncsnpp.NCSNpp(**TINY, **kwargs)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3)), jnp.ones(1)), KEY)


def test_image_size_must_halve():
  with pytest.raises(ValueError, match="cannot be halved 2 times"):
    model = ncsnpp.NCSNpp(**{**TINY, "ch_mult": (1, 2, 2)})
    jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 6, 6, 3)), jnp.ones(1)), KEY)


# --- scale_by_sigma, train mode, frozen Fourier features -------------------------------------------


def random_variables(model, x, labels, seed=0):
  """Random weights for ``model`` without compiling its initialiser: N(0, 1/fan_in) matrices and kernels,
  N(1, 0.1^2) normalisation scales, N(0, 0.05^2) other vectors (so no output layer starts at ~0)."""
  abstract = jax.eval_shape(lambda k: model.init(k, x, labels), KEY)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    shape, name = leaf.shape, str(getattr(path[-1], "key", path[-1]))
    if len(shape) >= 2:
      return rng.normal(size=shape).astype(np.float32) / np.sqrt(np.prod(shape[:-1]))
    return (name == "scale") + rng.normal(scale=0.1 if name == "scale" else 0.05, size=shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _pair(cls, **kwargs):
  """Outputs of one set of weights applied with and without ``scale_by_sigma``."""
  plain, scaled = cls(**kwargs), cls(**kwargs, scale_by_sigma=True)
  x = jax.random.normal(KEY, (2, 8, 8, 3))
  labels = jnp.array([0.5, 30.0]) if kwargs.get("continuous", True) else jnp.array([3.0, 997.0])
  variables = random_variables(plain, x, labels)
  return np.asarray(run(plain.apply, variables, x, labels)), np.asarray(run(scaled.apply, variables, x, labels)), labels


ONE_LEVEL = dict(nf=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, fir=False,
                 progressive_input="none")


def test_scale_by_sigma_divides_by_the_table_entry_of_a_discrete_label():
  # (Continuous VE labels are sigma itself: the VE reference fixtures check that division.)
  out, scaled, labels = _pair(ddpm.DDPM, nf=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                              continuous=False, sigma_min=0.01, sigma_max=50.0, num_scales=1000)
  sigmas = np.exp(np.linspace(np.log(50.0), np.log(0.01), 1000))  # descending, as the SMLD labels index it
  np.testing.assert_allclose(scaled, out / sigmas[labels.astype(int)][:, None, None, None], rtol=1e-5)


def test_dropout_acts_in_training():
  model = ncsnpp.NCSNpp(**{**ONE_LEVEL, "dropout": 0.5})
  x, labels = jax.random.normal(KEY, (1, 8, 8, 3)), jnp.ones(1)
  variables = random_variables(model, x, labels)
  outputs = run(jax.vmap(lambda key: model.apply(variables, x, labels, train=True, rngs={"dropout": key})),
                jax.random.split(jax.random.key(1)))
  assert not np.allclose(outputs[0], outputs[1])


def test_fourier_frequencies_never_train():
  proj = layers.GaussianFourierProjection(8, scale=16.0)
  variables = proj.init(KEY, jnp.ones(3))
  grads = jax.grad(lambda v: jnp.sum(proj.apply(v, jnp.array([0.1, 1.0, 3.0])) ** 2))(variables)
  np.testing.assert_array_equal(grads["params"]["W"], 0.0)
  w = np.asarray(variables["params"]["W"], np.float64)
  np.testing.assert_allclose(proj.apply(variables, jnp.array([0.5])),
                             np.concatenate([np.sin(0.5 * w * 2 * np.pi), np.cos(0.5 * w * 2 * np.pi)])[None],
                             rtol=1e-5, atol=1e-5)


# --- FIR resampling ------------------------------------------------------------------------------------


def _upfirdn_reference(x, k, up, down, pad0, pad1):
  """upfirdn by its definition, in float64 numpy loops: zero-stuff, pad (or crop), convolve, decimate."""
  b, height, width, c = x.shape
  u = np.zeros((b, height * up, width * up, c))
  u[:, ::up, ::up] = x
  u = np.pad(u, ((0, 0), (max(pad0, 0), max(pad1, 0)), (max(pad0, 0), max(pad1, 0)), (0, 0)))
  u = u[:, max(-pad0, 0):u.shape[1] - max(-pad1, 0), max(-pad0, 0):u.shape[2] - max(-pad1, 0)]
  size = k.shape[0]
  flipped = k[::-1, ::-1]
  out = np.zeros((b, u.shape[1] - size + 1, u.shape[2] - size + 1, c))
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      out[:, i, j] = np.einsum("bijc,ij->bc", u[:, i:i + size, j:j + size], flipped)
  return out[:, ::down, ::down]


@pytest.mark.parametrize("up, down, pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (3, 2, (1, 2)), (1, 1, (-1, 2))])
def test_upfirdn_matches_its_definition(up, down, pad):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  k = rng.normal(size=(4, 4)).astype(np.float32)  # asymmetric: a missing flip would show
  out = up_or_down_sampling.upfirdn_2d(jnp.asarray(x), k, up, down, pad)
  np.testing.assert_allclose(out, _upfirdn_reference(x, k, up, down, *pad), atol=1e-5)


@pytest.mark.parametrize("up, down, pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (3, 2, (1, 2)), (1, 1, (-1, 2)),
                                           (2, 1, (-1, 0)), (3, 1, (0, 3)), (2, 2, (3, -1))])
@pytest.mark.slow
def test_separable_upfirdn_matches_its_definition_and_its_adjoint(up, down, pad):
  """Separable kernels take the two 1-D passes (polyphase when only upsampling)."""
  rng = np.random.default_rng(1)
  k = np.outer(rng.normal(size=4), rng.normal(size=4)).astype(np.float32)  # different rows and columns
  x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
  upfirdn = jax.jit(lambda v: up_or_down_sampling.upfirdn_2d(v, k, up, down, pad))
  out = upfirdn(jnp.asarray(x))
  np.testing.assert_allclose(out, _upfirdn_reference(x, k, up, down, *pad), atol=1e-5)
  # The gradient is the transposed linear map: columns of the reference's Jacobian, one pixel at a time.
  small = (1, 4, 3, 1)
  basis = np.eye(np.prod(small)).reshape(-1, *small)
  images = [_upfirdn_reference(e, k, up, down, *pad) for e in basis]
  jacobian = np.stack([image.ravel() for image in images])  # (in, out)
  g = rng.normal(size=images[0].shape).astype(np.float32)
  _, vjp = jax.vjp(upfirdn, jnp.zeros(small, jnp.float32))
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0].ravel(), jacobian @ g.ravel(), atol=1e-5)


def test_fir_resampling_keeps_constants_and_fuses_with_convolutions():
  rng = np.random.default_rng(1)
  ones = jnp.ones((1, 8, 8, 2))
  np.testing.assert_allclose(up_or_down_sampling.upsample_2d(ones)[:, 2:-2, 2:-2], 1.0, rtol=1e-6)
  np.testing.assert_allclose(up_or_down_sampling.downsample_2d(ones)[:, 1:-1, 1:-1], 1.0, rtol=1e-6)
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 2)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)
  conv = functools.partial(lax.conv_general_dilated, rhs=w, window_strides=(1, 1), padding="SAME",
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # The fused ops equal "resample, then convolve" (and "convolve, then resample") away from the borders,
  # where the fused op pads once instead of twice.
  up = up_or_down_sampling.upsample_conv_2d(x, w)
  np.testing.assert_allclose(up[:, 2:-2, 2:-2], conv(up_or_down_sampling.upsample_2d(x))[:, 2:-2, 2:-2], atol=1e-5)
  down = up_or_down_sampling.conv_downsample_2d(x, w)
  np.testing.assert_allclose(down[:, 1:-1, 1:-1], up_or_down_sampling.downsample_2d(conv(x))[:, 1:-1, 1:-1],
                             atol=1e-5)
  assert up.shape == (1, 16, 16, 3) and down.shape == (1, 4, 4, 3)
  np.testing.assert_allclose(up_or_down_sampling.naive_downsample_2d(up_or_down_sampling.naive_upsample_2d(x)), x)
