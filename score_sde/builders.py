"""Where a config becomes objects, and where a config is checked.

    builders.validate(config)                                 # every rule, nothing compiled
    sde, network = builders.build_sde(config), builders.build_network(config)
    init_state, train_fn, eval_fn = builders.build_step_fns(config, sde, network)
    sampler = builders.build_sampler(config, sde, (B,) + builders.example_shape(config))
    restored = builders.restore(config, workdir)              # the EMA score (or logit) function

The algorithm modules take plain arguments; this module alone reads a ``ConfigDict``. A library
``ValueError`` raised while building is re-raised naming the config fields that fed it, so every
refusal says which ``--config.<field>`` to change.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import json
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from score_sde import bound as bound_lib
from score_sde import checkpoints
from score_sde import datasets
from score_sde import dequantization
from score_sde import guidance
from score_sde import likelihood as likelihood_lib
from score_sde import losses
from score_sde import models
from score_sde import parallel
from score_sde import sample_quality
from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde.models import classifier as classifier_lib
from score_sde.models import dequantizer as dequantizer_lib
from score_sde.models import wrapper

Array = jax.Array

# What a run trains (``config.training.objective``): a score network, a noise-conditional classifier, or a
# variational dequantiser of a frozen score model.
OBJECTIVES = ("score", "classifier", "dequantizer")
_FREQS = ("log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption")

# Sampler options by ``config.sampling.method``: {keyword of the sampler: field of config.sampling}.
# A field left at 0 or "" means the method's own default (see ``sampling_options``).
_FIXED_BUDGET = {"nfe": "nfe", "order": "order", "time_grid": "time_grid", "rho": "rho", "eps": "eps",
                 "denoise": "noise_removal"}
SAMPLER_FIELDS: dict[str, dict[str, str]] = {
    "pc": {"predictor": "predictor", "corrector": "corrector", "snr": "snr", "n_steps": "n_steps_each",
           "probability_flow": "probability_flow", "denoise": "noise_removal", "eps": "eps",
           "num_steps": "num_steps", "step_rule": "step_rule"},
    "ode": {"rtol": "rtol", "atol": "atol", "eps": "eps", "denoise": "noise_removal", "solver": "ode_solver"},
    "euler": _FIXED_BUDGET,
    "heun": {**_FIXED_BUDGET, "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax", "s_noise": "s_noise"},
    "dpm_solver": {**_FIXED_BUDGET, "solver_type": "solver_type"},
    "dpm_solver++": {**_FIXED_BUDGET, "eta": "eta", "solver_type": "solver_type",
                     "lower_order_final": "lower_order_final"},
    "unipc": {**_FIXED_BUDGET, "variant": "variant", "lower_order_final": "lower_order_final",
              "corrector": "unipc_corrector"},
}


# --- Errors that name the config ------------------------------------------------------------------


def _value(config: ml_collections.ConfigDict, field: str) -> Any:
  for part in field.split("."):
    config = config[part]
  return config


@contextlib.contextmanager
def _fields(config: ml_collections.ConfigDict, fields: dict[str, str]) -> Iterator[None]:
  """Re-raises a library ``ValueError`` as ``config.<field>=<value>: <message>``.

  ``fields`` maps the names a library message may use (keywords) to config fields; the fields whose
  keyword the message mentions are named, or all of them when it mentions none. A message that
  already starts with ``config.`` passes unchanged.
  """
  try:
    yield
  except ValueError as e:
    message = str(e)
    if message.startswith("config."):
      raise
    found = {}  # field -> first position of its keyword in the message
    for word, field in fields.items():
      match = re.search(rf"(?<![\w.]){re.escape(word)}\b", message)
      if match:
        found[field] = min(found.get(field, match.start()), match.start())
    named = sorted(found, key=found.get) or list(dict.fromkeys(fields.values()))
    where = ", ".join(f"config.{field}={_value(config, field)!r}" for field in named)
    raise ValueError(f"{where}: {message} Set it with --config.{named[0]}=<value>.") from e


def _choice(field: str, value: Any, valid: Any) -> None:
  """Refuses a name that is not one of ``valid``, naming the field, the choices and a near match."""
  valid = sorted(valid)
  if value in valid:
    return
  near = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
  hint = f" Did you mean {near[0]!r}?" if near else ""
  raise ValueError(f"config.{field}={value!r} is not one of {valid}.{hint} Set it with "
                   f"--config.{field}=<{'|'.join(map(str, valid))}>.")


# --- Data, SDE, network, optimiser -----------------------------------------------------------------


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """One example's shape: (2,) for toy sets, else (image_size, image_size, num_channels)."""
  name = config.data.dataset.lower()
  _choice("data.dataset", name, list(datasets.TOY_DATASETS) + list(datasets.IMAGE_DATASETS))
  if name in datasets.TOY_DATASETS:
    return (2,)
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def is_image_set(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config.data.dataset`` holds 8-bit images (bits/dim and pictures apply)."""
  return len(example_shape(config)) == 3


def build_sde(config: ml_collections.ConfigDict) -> sde_lib.SDE:
  """The SDE ``training.sde`` with N = ``model.num_scales`` and its other arguments from ``config.model``."""
  name = config.training.sde.lower()
  _choice("training.sde", name, sde_lib.SDES)
  parameters = [p for p in inspect.signature(sde_lib.SDES[name]).parameters if p != "N" and p in config.model]
  with _fields(config, {"N": "model.num_scales", **{p: f"model.{p}" for p in parameters}}):
    return sde_lib.get_sde(name, N=config.model.num_scales, **{p: config.model[p] for p in parameters})


def build_network(config: ml_collections.ConfigDict):
  """The network ``training.objective`` trains: the score network ``config.model``, the classifier
  ``config.classifier`` or the dequantiser ``config.dequantizer``."""
  objective = config.training.objective
  _choice("training.objective", objective, OBJECTIVES)
  if objective == "dequantizer":
    return dequantizer_lib.VariationalDequantizer(features=config.dequantizer.features,
                                                  num_steps=config.dequantizer.num_steps)
  if objective == "classifier":
    with _fields(config, {"name": "classifier.name"}):
      return classifier_lib.get_classifier(config)
  _choice("model.name", config.model.name.lower(), models.MODELS)
  with _fields(config, {"remat": "model.remat", "dtype": "model.dtype"}):
    return models.get_model(config)


def init_params(key: Array, network, example: tuple[int, ...]) -> Any:
  """The network's initial parameters for examples of shape ``example``."""
  shape = (1,) + tuple(example)
  if isinstance(network, dequantizer_lib.VariationalDequantizer):  # q(u | x) of 8-bit x
    return network.init(key, jnp.zeros(shape), jnp.zeros(shape, jnp.int32))["params"]
  return wrapper.init_model(key, network, shape)["params"]


@functools.lru_cache(maxsize=16)
def abstract_params(network, example: tuple[int, ...]) -> Any:
  """The network's parameters as ``jax.ShapeDtypeStruct`` leaves (traced once per network and shape)."""
  return jax.eval_shape(lambda: init_params(jax.random.key(0), network, example))


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with warm-up and clipping from ``config.optim`` (``losses.get_optimizer``); a dequantiser run
  updates its flow only (the score model in ``params["score"]`` stays frozen)."""
  o = config.optim
  with _fields(config, {**{k: f"optim.{k}" for k in ("optimizer", "lr", "warmup", "grad_clip", "weight_decay",
                                                     "beta1", "beta2")}, "adam_eps": "optim.eps"}):
    adam = losses.get_optimizer(lr=o.lr, beta1=o.beta1, beta2=o.beta2, adam_eps=o.eps, weight_decay=o.weight_decay,
                                warmup=o.warmup, grad_clip=o.grad_clip, optimizer=o.optimizer)
  if config.training.objective != "dequantizer":
    return adam
  labels = lambda params: {"flow": jax.tree.map(lambda _: "train", params["flow"]),
                           "score": jax.tree.map(lambda _: "frozen", params["score"])}
  return optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels)


# --- Losses and train / eval steps ----------------------------------------------------------------


def _labelled(config: ml_collections.ConfigDict, network) -> bool:
  """Whether the objective reads labels: a classifier, or a class-conditional score network."""
  return config.training.objective == "classifier" or wrapper.num_classes_of(network) > 0


def build_loss_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE, network, *, train: bool) -> Callable:
  """``loss_fn(key, params, inputs) -> (loss, aux)`` of ``training.objective`` (aux has ``per_example``).

  ``inputs`` are model-space images, or {"image", "label"} when ``_labelled``.
  """
  t = config.training
  if t.objective == "classifier":
    return losses.get_classifier_loss_fn(sde, wrapper.get_logit_fn_builder(sde, network), train=train, eps=t.eps)
  if t.objective == "dequantizer":
    return _dequantizer_loss_fn(config, network)
  fields = {"continuous": "training.continuous", "likelihood_weighting": "training.likelihood_weighting",
            "importance_weighting": "training.importance_weighting", "label_dropout": "training.label_dropout",
            "eps": "training.eps", "embedding_type": "model.embedding_type",
            "scale_by_sigma": "model.scale_by_sigma", "num_classes": "model.num_classes", "SDE": "training.sde",
            "N": "model.num_scales"}
  with _fields(config, fields):
    build_score_fn = wrapper.get_score_fn_builder(sde, network, continuous=t.continuous)
    loss = lambda builder: losses.get_loss_fn(
        sde, builder, train=train, continuous=t.continuous, reduce_mean=t.reduce_mean,
        likelihood_weighting=t.likelihood_weighting, importance_weighting=t.importance_weighting, eps=t.eps)
    num_classes = wrapper.num_classes_of(network)
    if not num_classes:
      return loss(build_score_fn)
    return losses.get_class_conditional_loss_fn(loss, build_score_fn, num_classes=num_classes,
                                                label_dropout=t.label_dropout)


SCORE_CONFIG = "score_config.json"  # a dequantiser run's copy of its score model's config


def score_run_config(config: ml_collections.ConfigDict, workdir: str | epath.PathLike | None = None
                     ) -> ml_collections.ConfigDict:
  """The config of the score model a dequantiser ``config`` belongs to: the copy in its run's ``workdir``
  (``SCORE_CONFIG``), else ``dequantizer.score_workdir/config.json``, checked against ``config.data``."""
  copy = epath.Path(workdir) / SCORE_CONFIG if workdir else None
  if copy is not None and copy.exists():
    return ml_collections.ConfigDict(json.loads(copy.read_text()))
  score_workdir = config.dequantizer.score_workdir
  field = f"config.dequantizer.score_workdir={score_workdir!r}"
  if not score_workdir:
    raise ValueError("config.dequantizer.score_workdir is empty: a dequantiser is trained on a frozen score model; "
                     "set --config.dequantizer.score_workdir to the workdir of a trained score model's run.")
  path = epath.Path(score_workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{field} holds no config.json of a training run; train the score model there first, "
                            f"or point the field at its workdir.")
  score_config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if score_config.training.objective != "score":
    raise ValueError(f"{field} holds a {score_config.training.objective!r} run, not a score model; set "
                     f"--config.dequantizer.score_workdir to the workdir of a score model's run.")
  fields = ("dataset", "image_size", "num_channels", "centered")
  if any(str(score_config.data[f]).lower() != str(config.data[f]).lower() for f in fields):
    raise ValueError(f"The score model of {field} was trained on data {[score_config.data[f] for f in fields]} "
                     f"({', '.join(fields)}), the dequantiser config has {[config.data[f] for f in fields]}; "
                     f"give the dequantiser the score model's data settings.")
  if not checkpoints.list_steps(score_workdir):
    raise FileNotFoundError(f"{field} holds no checkpoint; train the score model there first.")
  return score_config


def _frozen_score_params(config: ml_collections.ConfigDict) -> Callable[[], Any]:
  """``() -> the EMA parameters of the newest checkpoint of dequantizer.score_workdir``, read once."""
  cache = []

  def params() -> Any:
    if not cache:  # first called when the train state is traced: read the checkpoint eagerly all the same
      score_config = score_run_config(config)
      with jax.ensure_compile_time_eval():
        restored = restore(score_config, config.dequantizer.score_workdir)
      cache.append(jax.device_get(restored.fn.variables["params"]))
    return cache[0]

  return params


def _dequantizer_loss_fn(config: ml_collections.ConfigDict, network) -> Callable:
  """``loss_fn(key, {"flow", "score"}, 8-bit images)``: the flow's bound on -log P(x) (nats per dimension)
  through the variational bound of the frozen score model (``dequantization.get_loss_fn``)."""
  scaler = datasets.get_data_scaler(config.data.centered)
  e = config.eval

  def loss_fn(key: Array, params: Any, images: Array):
    score_config = score_run_config(config)  # read when traced: validating a config reads no run
    score_sde, score_network = build_sde(score_config), build_network(score_config)
    build_score_fn = wrapper.get_score_fn_builder(score_sde, score_network,
                                                  continuous=score_config.training.continuous)
    score_fn = build_score_fn(jax.lax.stop_gradient(params["score"]), None, False)
    nll_fn = dequantization.bound_nll_fn(score_sde, score_fn, eps=e.eps, decoder=e.bound_decoder,
                                         num_time_samples=config.dequantizer.time_samples)
    return dequantization.get_loss_fn(network, nll_fn, scaler)(key, {"params": params["flow"]}, images)

  return loss_fn


def _inputs(config: ml_collections.ConfigDict, network) -> Callable[[dict[str, Array]], Any]:
  """Pipeline batches {"image": [0, 1] data, "label"} -> the loss's inputs (the data scaler on device)."""
  if config.training.objective == "dequantizer":  # the 8-bit images themselves
    return lambda batch: jnp.round(batch["image"] * 255.0).astype(jnp.int32)
  scaler = datasets.get_data_scaler(config.data.centered)
  if _labelled(config, network):
    return lambda batch: {"image": scaler(batch["image"]), "label": batch["label"]}
  return lambda batch: scaler(batch["image"])


def build_step_fns(config: ml_collections.ConfigDict, sde: sde_lib.SDE, network,
                   example: tuple[int, ...] | None = None) -> tuple[Callable, Callable, Callable]:
  """The pure programs of training, before any sharding: ``(init_state, train_fn, eval_fn)``.

  ``init_state(key) -> TrainState``; ``train_fn(key, state, batch) -> (state, metrics)``;
  ``eval_fn(key, state, batch) -> {"loss", ...}`` (means; a classifier's also ``accuracy``). Batches
  are {"image": [0, 1] data (B, *example), "label": (B,) int}, with a leading axis
  ``n_jitted_steps`` when it is > 1.
  """
  t = config.training
  example = tuple(example or example_shape(config))
  optimizer = build_optimizer(config)
  with _fields(config, {"nonfinite": "training.nonfinite", "ema_rate": "model.ema_rate"}):
    train_step = losses.get_step_fn(build_loss_fn(config, sde, network, train=True), optimizer, train=True,
                                    ema_rate=config.model.ema_rate, ema_warmup=config.model.ema_warmup,
                                    n_jitted_steps=t.n_jitted_steps, nonfinite=t.nonfinite)
  eval_step = losses.get_step_fn(build_loss_fn(config, sde, network, train=False), optimizer, train=False,
                                 n_jitted_steps=t.n_jitted_steps)
  inputs = _inputs(config, network)

  frozen = _frozen_score_params(config) if t.objective == "dequantizer" else None

  def init_state(key: Array) -> losses.TrainState:
    params = init_params(key, network, example)
    if frozen is not None:
      params = {"flow": params, "score": frozen()}
    return losses.init_train_state(params, optimizer)

  def train_fn(key: Array, state: losses.TrainState, batch: dict[str, Array]):
    return train_step(key, state, inputs(batch))

  def eval_fn(key: Array, state: losses.TrainState, batch: dict[str, Array]) -> dict[str, Array]:
    return jax.tree.map(jnp.mean, eval_step(key, state, inputs(batch))[1])

  return init_state, train_fn, eval_fn


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted programs of a training run and the shardings they take."""

  init: Callable
  train: Callable
  eval: Callable
  state_sharding: Any
  batch_sharding: Any
  state_shapes: Any


def build_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, sde: sde_lib.SDE, network,
                   example: tuple[int, ...], init_key: jax.Array) -> Programs:
  """The training loop's jitted init / train / eval programs: state replicated (or split over "fsdp") and donated
  to the train step, batches sharded over the whole mesh (axis 1 when ``n_jitted_steps`` > 1). ``init_key`` may be
  abstract (``jax.eval_shape``) where only the programs' shapes are needed."""
  init_state, train_fn, eval_fn = build_step_fns(config, sde, network, example)
  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.batch_sharding(mesh, 0 if config.training.n_jitted_steps == 1 else 1)
  state_shapes = jax.eval_shape(init_state, init_key)
  state_sharding = parallel.state_sharding(state_shapes, mesh)
  return Programs(
      init=jax.jit(init_state, out_shardings=state_sharding),
      train=jax.jit(train_fn, in_shardings=(replicated, state_sharding, batch_sharding),
                    out_shardings=(state_sharding, replicated), donate_argnums=1),
      eval=jax.jit(eval_fn, in_shardings=(replicated, state_sharding, batch_sharding), out_shardings=replicated),
      state_sharding=state_sharding, batch_sharding=batch_sharding, state_shapes=state_shapes)


def build_eval_loss_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE, network) -> Callable:
  """``fn(key, params, batch) -> (B,)``: each example's training objective (``train=False``)."""
  loss_fn, inputs = build_loss_fn(config, sde, network, train=False), _inputs(config, network)
  return lambda key, params, batch: loss_fn(key, params, inputs(batch))[1]["per_example"]


def check_training(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> None:
  """The training loop's rules: step frequencies, checkpoint retention, and (with a mesh) batch sizes."""
  t = config.training
  k = t.n_jitted_steps
  for field in ("batch_size", "n_iters", "n_jitted_steps", "fsdp"):
    if int(t[field]) != t[field] or t[field] < 1:
      raise ValueError(f"config.training.{field}={t[field]!r} must be a positive integer; set "
                       f"--config.training.{field}.")
  for field in _FREQS:
    value = t[field]
    if int(value) != value or value < 1 or value % k:
      raise ValueError(f"config.training.{field}={value} must be a positive multiple of training.n_jitted_steps="
                       f"{k} (the loop stops every {k} steps); set e.g. --config.training.{field}="
                       f"{max(k, int(value) // k * k)}.")
  if t.n_iters < k:
    raise ValueError(f"config.training.n_iters={t.n_iters} is less than one call of config.training."
                     f"n_jitted_steps={k} steps; raise --config.training.n_iters or lower n_jitted_steps.")
  for field in ("keep_checkpoints", "max_skipped", "profile_steps", "profile_start"):
    if int(t[field]) != t[field] or t[field] < 0:
      raise ValueError(f"config.training.{field}={t[field]!r} must be a non-negative integer; set "
                       f"--config.training.{field}.")
  for field in ("num_workers", "num_threads"):
    if int(config.data[field]) != config.data[field] or config.data[field] < 0:
      raise ValueError(f"config.data.{field}={config.data[field]!r} must be a non-negative integer; set "
                       f"--config.data.{field}.")
  if t.objective != "score" and t.snapshot_sampling:
    raise ValueError(f"config.training.snapshot_sampling=True, but a {t.objective} run has no samples to snapshot; "
                     f"set --config.training.snapshot_sampling=False.")
  if t.objective == "dequantizer" and config.data.dataset.lower() not in datasets.IMAGE_DATASETS:
    raise ValueError(f"config.training.objective='dequantizer' dequantises 8-bit images, and "
                     f"{config.data.dataset!r} is not an image set; set --config.data.dataset to one.")
  if mesh is not None:
    parallel.check_batch_size(t.batch_size, mesh, "config.training.batch_size")
    if t.snapshot_sampling:
      parallel.check_batch_size(config.sampling.batch_size, mesh, "config.sampling.batch_size")


# --- Samplers and likelihoods ---------------------------------------------------------------------


def sampling_options(sampling: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  """``(method, keywords)`` of ``sampling.get_sampler`` from a ``config.sampling`` section.

  Fields at 0 or "" (``nfe``, ``order``, ``num_steps``, ``time_grid``, ``variant``, ``solver_type``)
  keep the method's own default.
  """
  method = sampling.method
  _choice("sampling.method", method, SAMPLER_FIELDS)
  options = {}
  for keyword, field in SAMPLER_FIELDS[method].items():
    value = sampling[field]
    if isinstance(value, (int, str)) and not isinstance(value, bool) and value in (0, ""):
      continue
    options[keyword] = tuple(value) if isinstance(value, list) else value
  return method, options


def build_sampler(config: ml_collections.ConfigDict, sde: sde_lib.SDE, shape: tuple[int, ...]) -> Callable:
  """The sampler of ``config.sampling`` for batches of ``shape`` (B, ...).

  Returns:
    ``sampler(key, score_fn, first_index=0, ...) -> (samples (B, ...), nfe)`` (``sampling.get_sampler``).
  """
  method, options = sampling_options(config.sampling)
  fields = {keyword: f"sampling.{field}" for keyword, field in SAMPLER_FIELDS[method].items()}
  with _fields(config, {"method": "sampling.method", **fields}):
    return sampling.get_sampler(sde, tuple(shape), method=method, **options)


def sampler_tag(config: ml_collections.ConfigDict) -> str:
  """A short, file-name-safe name of ``config.sampling``, e.g. ``pc-reverse_diffusion-langevin-1000`` or
  ``unipc-nfe10-order2-variantbh2``; guidance adds ``-cfg2`` / ``-classifier3``."""
  sampling = config.sampling
  method, options = sampling_options(sampling)
  if method == "pc":
    parts = [sampling.predictor, sampling.corrector, str(sampling.num_steps or config.model.num_scales)]
    if sampling.probability_flow:
      parts.append("pf")
  elif method == "ode":
    parts = [f"tol{sampling.rtol:g}"]
  else:
    parts = [f"{k}{options[k]}" for k in ("nfe", "order", "time_grid", "variant", "solver_type") if k in options]
    if not sampling.noise_removal:
      parts.append("nodenoise")
    if options.get("eta"):
      parts.append(f"eta{options['eta']:g}")
    if options.get("s_churn"):
      parts.append(f"churn{options['s_churn']:g}")
  if sampling.guidance == "classifier_free":
    parts.append(f"cfg{sampling.guidance_scale:g}")
  elif sampling.guidance == "classifier":
    parts.append(f"classifier{sampling.guidance_scale:g}")
  return re.sub(r"[^A-Za-z0-9_.+=-]", "_", "-".join([method.replace("+", "p")] + parts))


def likelihood_tag(config: ml_collections.ConfigDict) -> str:
  """A short, file-name-safe name of the likelihood settings ``config.eval``, e.g. ``rademacher-tol1e-05-eps1e-05``
  or ``rademacher-tol1e-05-eps1e-05-ode+bound-uniform+variational-K4``."""
  e = config.eval
  parts = [e.divergence, f"tol{max(e.rtol, e.atol):g}", f"eps{e.eps:g}"]
  if tuple(e.likelihood_estimators) != ("ode",):
    parts.append("+".join(e.likelihood_estimators))
    if "bound" in e.likelihood_estimators:
      parts.append(f"T{e.bound_time_samples}{'tweedie' if e.bound_decoder == 'tweedie' else ''}")
  if is_image_set(config) and tuple(e.dequantizers) != ("uniform",):
    parts.append("+".join(e.dequantizers))
  if e.importance_samples != 1:
    parts.append(f"K{e.importance_samples}")
  return "-".join(parts)


def parse_sampler_settings(config: ml_collections.ConfigDict, entry: str) -> ml_collections.ConfigDict:
  """``config.sampling`` with the overrides of one ``eval.samplers`` entry, ``method[:field=value,...]``.

  E.g. ``"dpm_solver++:nfe=10,order=2"`` or ``"pc:predictor=reverse_diffusion,corrector=langevin"``.
  """
  sampling = ml_collections.ConfigDict(config.sampling.to_dict())
  method, _, rest = entry.strip().partition(":")
  sampling.method = method.strip()
  for item in filter(None, (s.strip() for s in rest.split(","))):
    name, eq, text = item.partition("=")
    name = name.strip()
    if not eq or name not in sampling:
      near = difflib.get_close_matches(name, list(sampling.keys()), n=1)
      raise ValueError(f"config.eval.samplers entry {entry!r}: {item!r} is not field=value of config.sampling"
                       f"{f'; did you mean {near[0]!r}?' if near else '.'} Write entries as "
                       f"'method:field=value,field=value', e.g. 'dpm_solver++:nfe=10,order=2'.")
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    try:
      sampling[name] = type(sampling[name])(value) if isinstance(sampling[name], float) else value
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.eval.samplers entry {entry!r}: {name}={text!r} does not fit config.sampling."
                       f"{name} ({type(sampling[name]).__name__}): {e}") from e
  return sampling


def with_sampling(config: ml_collections.ConfigDict, sampling: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``sampling`` section is ``sampling``."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.sampling = sampling
  return out


def eval_sampler_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """``{tag: config}`` of every sampler setting ``--mode eval`` evaluates (``eval.samplers``, or the config's own)."""
  entries = tuple(config.eval.samplers) or (None,)
  out = {}
  for entry in entries:
    tagged = config if entry is None else with_sampling(config, parse_sampler_settings(config, entry))
    tag = sampler_tag(tagged)
    if tag in out:
      raise ValueError(f"config.eval.samplers lists the setting {tag!r} twice; remove one of them.")
    out[tag] = tagged
  return out


ESTIMATORS = ("ode", "bound")
DEQUANTIZERS = ("uniform", "truncated_normal", "variational")


def likelihood_rows(config: ml_collections.ConfigDict) -> list[tuple[str, str | None]]:
  """The (estimator, dequantiser) pairs ``eval`` asks for; 2-D data has no dequantiser (None)."""
  e = config.eval
  for estimator in e.likelihood_estimators:
    _choice("eval.likelihood_estimators", estimator, ESTIMATORS)
  if not is_image_set(config):
    return [(estimator, None) for estimator in e.likelihood_estimators]
  for name in e.dequantizers:
    _choice("eval.dequantizers", name, DEQUANTIZERS)
  if not (e.likelihood_estimators and e.dequantizers):
    raise ValueError("config.eval.likelihood_estimators and config.eval.dequantizers need at least one entry each, "
                     "e.g. --config.eval.likelihood_estimators=\"('ode',)\" --config.eval.dequantizers=\"('uniform',)\".")
  return [(estimator, name) for estimator in e.likelihood_estimators for name in e.dequantizers]


def build_dequantizer(config: ml_collections.ConfigDict, sde: sde_lib.SDE, name: str, *,
                      devices: list[jax.Device] | None = None) -> Any:
  """The dequantiser ``name`` as a pytree ``fn(key, x) -> (u, log q)``: ``uniform``; ``truncated_normal`` with
  i-DODE's std (the model's noise level at ``eval.eps`` in quantisation bins); or ``variational``, the trained
  flow of ``eval.dequantizer_workdir``."""
  _choice("eval.dequantizers", name, DEQUANTIZERS)
  if name == "uniform":
    return jax.tree_util.Partial(dequantization.uniform)
  if name == "truncated_normal":
    bin_width = (2.0 if config.data.centered else 1.0) / 256.0
    return jax.tree_util.Partial(dequantization.truncated_normal(dequantization.matched_std(sde, config.eval.eps,
                                                                                          bin_width)))
  workdir = epath.Path(config.eval.dequantizer_workdir or ".")
  field = f"config.eval.dequantizer_workdir={config.eval.dequantizer_workdir!r}"
  if not config.eval.dequantizer_workdir or not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{field} holds no dequantiser run; train one (training.objective='dequantizer', e.g. "
                            f"configs/dequantizer/digits_flow.py) and set the field to its workdir.")
  deq_config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  if deq_config.training.objective != "dequantizer":
    raise ValueError(f"{field} holds a {deq_config.training.objective!r} run, not a dequantiser; set "
                     f"--config.eval.dequantizer_workdir to a run of training.objective='dequantizer'.")
  if example_shape(deq_config) != example_shape(config):
    raise ValueError(f"The dequantiser of {field} was trained on examples of shape {example_shape(deq_config)}, "
                     f"these are {example_shape(config)}; train a dequantiser on this score model's data "
                     f"(dequantizer.score_workdir) and point the field at it.")
  return restore(deq_config, workdir, devices=devices).fn


def build_likelihood_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE, eight_bit: bool,
                        estimator: str = "ode") -> Callable:
  """``fn(key, score_fn, data, dequantizer) -> (values (B,), nfe ())`` of ``estimator``.

  8-bit images in [0, 1]: bits/dim of the bound on -log P(x) through ``dequantizer`` with
  ``eval.importance_samples`` samples; 2-D data: log p in nats (the bound's -B for ``bound``), the
  dequantizer unused. ``ode`` takes ``eval.{divergence, rtol, atol, eps}``; ``bound`` takes
  ``eval.{eps, bound_time_samples, bound_decoder}``. nfe: score evaluations per example.
  """
  e = config.eval
  _choice("eval.likelihood_estimators", estimator, ESTIMATORS)
  scaler = datasets.get_data_scaler(config.data.centered)
  if estimator == "ode":
    options = dict(divergence=e.divergence, rtol=e.rtol, atol=e.atol, eps=e.eps)
  else:
    options = dict(eps=e.eps, num_time_samples=e.bound_time_samples, decoder=e.bound_decoder)
  k = e.importance_samples
  bound_nfe = e.bound_time_samples * (2 if e.bound_decoder == "tweedie" else 1)
  fields = {**{key: f"eval.{key}" for key in ("divergence", "rtol", "atol", "eps", "importance_samples")},
            "num_time_samples": "eval.bound_time_samples", "decoder": "eval.bound_decoder", "num_samples":
            "eval.importance_samples"}
  with _fields(config, fields):
    if eight_bit:
      dequantization.get_bpd_fn(sde, dequantization.uniform, estimator, k, scaler, **options)  # checks the options

      def images_bpd(key, score_fn, images, dequantizer):
        bpd_fn = dequantization.get_bpd_fn(sde, dequantizer, estimator, k, scaler, **options)
        bpd, aux = bpd_fn(key, score_fn, jnp.round(images * 255.0).astype(jnp.int32))
        return bpd, (aux["nfe"] * k if estimator == "ode" else jnp.asarray(bound_nfe * k))

      return images_bpd
    estimate = (likelihood_lib.get_likelihood_fn(sde, **options) if estimator == "ode"
                else bound_lib.get_bound_fn(sde, **options))

  def points_logp(key, score_fn, points, dequantizer):
    del dequantizer
    # log p(u) = log p(x) + log|dx/du| for the elementwise data scaler x = s(u).
    x, dx_du = jax.jvp(scaler, (points,), (jnp.ones_like(points),))
    log_det = jnp.sum(jnp.log(jnp.abs(dx_du)).reshape(points.shape[0], -1), axis=1)
    if estimator == "ode":
      logp, _, nfe = estimate(key, score_fn, x)
      return logp + log_det, nfe
    nll, _ = estimate(key, score_fn, x)
    return -nll + log_det, jnp.asarray(bound_nfe)

  return points_logp


# --- Restoring trained runs ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint's EMA weights as a function: a ``ScoreFunction`` (score models) or a ``LogitFunction``
  (classifiers) of (x (B, ...), t (B,)), or a dequantiser ``fn(key, x) -> (u, log q)``; ``network`` and
  ``sde`` built them."""

  sde: sde_lib.SDE
  network: Any
  fn: Any
  step: int


def restore(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *, step: int | None = None,
            devices: list[jax.Device] | None = None) -> Restored:
  """The EMA weights of a run's checkpoint (the newest that restores, or ``step``), replicated over ``devices``.

  Raises:
    FileNotFoundError: for a workdir without checkpoints.
    ValueError: for a missing ``step`` or parameters that do not fit the config's network.
  """
  sde, network = build_sde(config), build_network(config)
  replicated = parallel.replicated(parallel.make_mesh(devices))
  example = example_shape(config)
  shapes = abstract_params(network, example)
  if config.training.objective == "dequantizer":  # the flow and the frozen score model it was trained with
    shapes = {"flow": shapes, "score": abstract_params(build_network(score_run_config(config, workdir)), example)}
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
  with checkpoints.quiet_orbax():
    ema_params, restored_step = checkpoints.restore_ema_params(workdir, abstract, step=step)
  variables = {"params": ema_params}
  if config.training.objective == "dequantizer":
    fn = dequantization.variational(network, {"params": ema_params["flow"]})
  elif config.training.objective == "classifier":
    fn = wrapper.get_logit_fn(sde, network, variables)
  else:
    fn = wrapper.get_score_fn(sde, network, variables, continuous=config.training.continuous)
  return Restored(sde=sde, network=network, fn=fn, step=restored_step)


def restore_score_model(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, **kwargs) -> Restored:
  """``restore`` of a score model's run, refusing a classifier's."""
  if config.training.objective != "score":
    raise ValueError(f"{workdir} holds a {config.training.objective} run, not a score model; guide a score model's "
                     f"sampling with it through --config.sampling.classifier_workdir.")
  return restore(config, workdir, **kwargs)


# --- Guided sampling -------------------------------------------------------------------------------


def check_guidance(config: ml_collections.ConfigDict, network) -> None:
  """Refuses ``config.sampling`` guidance settings that cannot work with the score ``network``."""
  s = config.sampling
  _choice("sampling.guidance", s.guidance, guidance.GUIDANCES)
  num_classes = wrapper.num_classes_of(network)
  if s.guidance == "classifier_free" and not num_classes:
    raise ValueError("config.sampling.guidance='classifier_free' needs a class-conditional network: set "
                     "config.model.num_classes to the number of classes and train with config.training."
                     "label_dropout > 0 (e.g. 0.1), or set --config.sampling.guidance to 'classifier' (with "
                     "sampling.classifier_workdir) or 'none'.")
  if s.guidance == "classifier" and not s.classifier_workdir:
    raise ValueError("config.sampling.guidance='classifier' needs a trained noise-conditional classifier: set "
                     "--config.sampling.classifier_workdir to the workdir of a run of a training.objective="
                     "'classifier' config (e.g. configs/classifier/digits_wrn.py).")
  if s.class_labels and s.guidance == "none" and not num_classes:
    raise ValueError("config.sampling.class_labels were given, but the network is unconditional and "
                     "config.sampling.guidance='none'; set --config.sampling.guidance=classifier (with "
                     "sampling.classifier_workdir) or train a class-conditional network (model.num_classes).")
  labels = np.asarray(tuple(s.class_labels))
  if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
                      or (num_classes and labels.max() >= num_classes)):
    raise ValueError(f"config.sampling.class_labels={tuple(s.class_labels)} must be classes 0..C-1"
                     f"{f' (C = {num_classes})' if num_classes else ''}; set --config.sampling.class_labels.")


def _classifier_run(config: ml_collections.ConfigDict, sde: sde_lib.SDE) -> ml_collections.ConfigDict:
  """The config of ``sampling.classifier_workdir``'s run, checked against the score model's data and noise."""
  workdir = epath.Path(config.sampling.classifier_workdir)
  path = workdir / "config.json"
  field = f"config.sampling.classifier_workdir={str(workdir)!r}"
  if not path.exists():
    raise FileNotFoundError(f"{field} holds no config.json of a classifier run; set it to the workdir of "
                            f"`main.py --mode train --config configs/classifier/...`.")
  classifier_config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if classifier_config.training.objective != "classifier":
    raise ValueError(f"{field} holds a {classifier_config.training.objective!r} run, not a classifier "
                     f"(training.objective='classifier'); set it to a classifier's workdir.")
  shape, classifier_shape = example_shape(config), example_shape(classifier_config)
  if shape != classifier_shape or config.data.centered != classifier_config.data.centered:
    raise ValueError(f"The classifier of {field} was trained on examples of shape {classifier_shape} with "
                     f"data.centered={classifier_config.data.centered}, the score model on {shape} with "
                     f"data.centered={config.data.centered}; train the classifier on the same data and scaling.")
  classifier_sde = build_sde(classifier_config)
  t = jnp.linspace(1e-3, sde.T, 17)
  if not np.allclose(np.stack(sde.alpha_sigma(t)), np.stack(classifier_sde.alpha_sigma(t)), rtol=1e-5, atol=1e-6):
    raise ValueError(f"The classifier of {field} was trained on the noise of {classifier_sde!r}, the score model "
                     f"uses {sde!r}; train the classifier with the score model's training.sde and model.beta_* / "
                     f"model.sigma_* values.")
  if not checkpoints.list_steps(workdir):
    raise FileNotFoundError(f"No classifier checkpoint in {field}; train the classifier there first, or set the "
                            f"field to a trained classifier's workdir.")
  return classifier_config


def build_guided_score_fns(config: ml_collections.ConfigDict, restored: Restored, *,
                           devices: list[jax.Device] | None = None
                           ) -> Callable[[int, int], tuple[Any, np.ndarray | None]]:
  """The score function of each batch of samples under ``config.sampling``'s guidance.

  Sample i has class ``class_labels[i % n]`` (or class i mod C when empty). ``guidance`` is ``none``
  (the model's own score; conditional for a class-conditional network), ``classifier`` (the
  classifier of ``sampling.classifier_workdir``, scale ``guidance_scale``) or ``classifier_free``
  (weight w = ``guidance_scale``).

  Returns:
    ``for_batch(first, size) -> (score_fn, labels (size,) or None)`` for samples first..first+size-1.
  """
  check_guidance(config, restored.network)
  s = config.sampling
  score_fn = restored.fn
  num_classes = wrapper.num_classes_of(restored.network)
  if s.guidance == "none" and not num_classes:
    return lambda first, size: (score_fn, None)
  logit_fn = None
  if s.guidance == "classifier":
    classifier = restore(_classifier_run(config, restored.sde), s.classifier_workdir, devices=devices)
    logit_fn, num_classes = classifier.fn, classifier.network.num_classes
  cycle = np.asarray(tuple(s.class_labels) or range(num_classes), np.int64)
  if cycle.max() >= num_classes:
    raise ValueError(f"config.sampling.class_labels={tuple(s.class_labels)} must be classes 0..{num_classes - 1}; "
                     f"set --config.sampling.class_labels.")

  def for_batch(first: int, size: int) -> tuple[Any, np.ndarray]:
    labels = cycle[(first + np.arange(size)) % len(cycle)].astype(np.int32)
    if s.guidance == "classifier":
      return guidance.classifier_guided_score(score_fn, logit_fn, labels, s.guidance_scale), labels
    if s.guidance == "classifier_free":
      return guidance.classifier_free_guided_score(score_fn, labels, s.guidance_scale,
                                                   null_label=num_classes), labels
    return score_fn.replace(class_labels=jnp.asarray(labels)), labels

  return for_batch


# --- Checked once ----------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> None:
  """Runs the builders of ``config`` on abstract shapes (nothing compiles): every rule they hold.

  With ``mesh``, batch sizes must also divide over its devices (checked first, before any tracing).

  Raises:
    ValueError: naming the config field, its value and the fix.
  """
  e = config.eval
  for field in ("batch_size", "num_samples", "bpd_repeats"):
    if int(e[field]) != e[field] or e[field] < 1:
      raise ValueError(f"config.eval.{field}={e[field]!r} must be a positive integer; set --config.eval.{field}.")
  _choice("eval.bpd_dataset", e.bpd_dataset, ("train", "test"))
  features, dataset = sample_quality.feature_network_of(config), config.data.dataset.lower()
  fits = {"points": dataset in datasets.TOY_DATASETS, "digits": dataset in ("digits", "digits_rgb"),
          "inception": dataset in datasets.IMAGE_DATASETS}
  if not fits[features]:
    raise ValueError(f"config.eval.feature_network={features!r} does not measure samples of {config.data.dataset!r} "
                     f"(digits: the digits sets; points: 2-D sets; inception: images); leave it empty to choose by "
                     f"data set.")
  check_training(config, mesh)
  if mesh is not None:
    parallel.check_batch_size(e.batch_size, mesh, "config.eval.batch_size")
    parallel.check_batch_size(config.sampling.batch_size, mesh, "config.sampling.batch_size")
  example = example_shape(config)
  sde = build_sde(config)
  network = build_network(config)
  try:
    abstract_params(network, example)
  except ValueError as error:
    section = "classifier" if config.training.objective == "classifier" else "model"
    raise ValueError(f"config.{section}: the {config[section].name} network cannot be built for examples of shape "
                     f"{example}: {error}") from error
  build_step_fns(config, sde, network, example)
  if config.training.objective == "dequantizer" and not config.dequantizer.score_workdir:
    raise ValueError("config.dequantizer.score_workdir is empty: a dequantiser is trained on a frozen score model; "
                     "set --config.dequantizer.score_workdir to the workdir of a trained score model's run.")
  if config.training.objective == "score":
    check_guidance(config, network)
    for tagged in eval_sampler_configs(config).values():
      build_sampler(tagged, sde, (tagged.sampling.batch_size,) + example)
    for estimator, _ in likelihood_rows(config):
      build_likelihood_fn(config, sde, len(example) == 3, estimator)
    if "variational" in config.eval.dequantizers and not config.eval.dequantizer_workdir:
      raise ValueError("config.eval.dequantizers lists 'variational' but config.eval.dequantizer_workdir is empty; "
                       "set it to the workdir of a trained dequantiser (training.objective='dequantizer').")


__all__ = ["DEQUANTIZERS", "ESTIMATORS", "OBJECTIVES", "Programs", "Restored", "SAMPLER_FIELDS", "SCORE_CONFIG",
           "abstract_params", "build_dequantizer", "build_eval_loss_fn", "build_guided_score_fns",
           "build_likelihood_fn", "build_loss_fn", "build_network", "build_optimizer", "build_programs",
           "build_sampler", "build_sde", "build_step_fns", "check_guidance", "check_training", "eval_sampler_configs",
           "example_shape", "init_params", "is_image_set", "likelihood_rows", "likelihood_tag",
           "parse_sampler_settings", "restore", "restore_score_model", "sampler_tag", "sampling_options",
           "score_run_config", "validate", "with_sampling"]
