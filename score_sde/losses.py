"""Training objectives, optimiser, train state and the train / eval step.

Losses take a score-function builder ``build_score_fn(params, key, train) -> score_fn(x, t)`` (the model
wrapper alone knows what a network predicts) and model-space batches x_0 (B, ...). Denoising score
matching: E_t E_z [ w(t) || sigma_t s_theta(x_t, t) + z ||^2 ], x_t = alpha_t x_0 + sigma_t z; weightings,
the discrete DDPM / SMLD losses and class-conditional training: ``docs/training.md``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from score_sde import sde as sde_lib
from score_sde.models import edm as edm_lib
from score_sde.sampling import noise_levels

Array = jax.Array
Params = Any  # A pytree of arrays.
ScoreFn = sde_lib.ScoreFn
ScoreFnBuilder = sde_lib.ScoreFnBuilder
LossFn = Callable[[Array, Params, Array], tuple[Array, dict[str, Array]]]
"""``loss_fn(key, params, batch (B, ...)) -> (loss (), aux)``; aux holds ``per_example`` and ``t`` (B,)."""
StepFn = Callable[[Array, "TrainState", Any], tuple["TrainState", dict[str, Array]]]


def _reduce(squared: Array, reduce_mean: bool) -> Array:
  """Per-example reduction of (B, ...) to (B,): mean over dimensions, or 0.5 * sum (the original)."""
  flat = squared.reshape(squared.shape[0], -1)
  return jnp.mean(flat, axis=1) if reduce_mean else 0.5 * jnp.sum(flat, axis=1)


def _g2_over_sigma2(sde: sde_lib.SDE, t: Array) -> Array:
  """g(t)^2 / sigma_t^2, (B,) for t (B,)."""
  _, g = sde.sde(jnp.zeros((t.shape[0], 1)), t)
  _, sigma = sde.alpha_sigma(t)
  return (g / sigma) ** 2


# --- importance sampling of t ---------------------------------------------------------------------


def likelihood_importance_proposal(
    sde: sde_lib.SDE, eps: float, num_cells: int = 4096) -> Callable[[Array, int], tuple[Array, Array]]:
  """``sample(key, n) -> (t, q(t))`` (n,): q ~ g(t)^2 / sigma_t^2 on [eps, T], piecewise constant on
  ``num_cells`` geometric cells (trapezoidal masses); q is the exact density of the draw, so 1 / q weights
  stay unbiased."""
  with jax.ensure_compile_time_eval():  # A constant table, even when built inside a trace.
    edges = np.geomspace(eps, sde.T, num_cells + 1)
    h = np.asarray(_g2_over_sigma2(sde, jnp.asarray(edges, jnp.float32)), np.float64)
  if not np.all(np.isfinite(h) & (h > 0)):
    raise ValueError(f"g^2 / sigma^2 of {sde!r} is not finite and positive on [eps={eps}, T]; "
                     f"importance weighting needs sigma_t > 0 there (use a larger eps).")
  mass = 0.5 * (h[1:] + h[:-1]) * np.diff(edges)
  cdf = np.concatenate([[0.0], np.cumsum(mass)]) / mass.sum()
  density = mass / mass.sum() / np.diff(edges)
  edges_j, cdf_j, density_j = (jnp.asarray(a, jnp.float32) for a in (edges, cdf, density))

  def sample(key: Array, n: int) -> tuple[Array, Array]:
    u = jax.random.uniform(key, (n,))
    cell = jnp.clip(jnp.searchsorted(cdf_j, u, side="right") - 1, 0, num_cells - 1)
    frac = (u - cdf_j[cell]) / (cdf_j[cell + 1] - cdf_j[cell])
    t = edges_j[cell] + frac * (edges_j[cell + 1] - edges_j[cell])
    return jnp.clip(t, eps, sde.T), density_j[cell]

  return sample


# --- losses -------------------------------------------------------------------------------------------


def get_sde_loss_fn(sde: sde_lib.SDE, build_score_fn: ScoreFnBuilder, *, train: bool,
                    reduce_mean: bool = True, continuous: bool = True,
                    likelihood_weighting: bool = False, importance_weighting: bool = False,
                    eps: float = 1e-5) -> LossFn:
  """``loss_fn(key, params, x_0 (B, ...)) -> (loss, {"per_example", "t"})``: E w(t) || sigma_t s(x_t, t) + z ||^2.

  Args:
    reduce_mean: mean over dimensions per example, else 0.5 * sum.
    continuous: t ~ U(eps, T); ``False``: t on the grid i / (N - 1) with the SDE's own marginals.
    likelihood_weighting: lambda(t) = g(t)^2 instead of sigma_t^2 (w = lambda / sigma_t^2).
    importance_weighting: t ~ q(t) ~ g^2 / sigma^2, reweighted (needs ``likelihood_weighting``).
  """
  if not 0 < eps < sde.T:
    raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}; the score is undefined at sigma_0 = 0 "
                     f"(the original used 1e-5).")
  if importance_weighting and not likelihood_weighting:
    raise ValueError("importance_weighting samples t for the likelihood-weighted objective; "
                     "set likelihood_weighting=True too, or importance_weighting=False.")
  if likelihood_weighting and not continuous:
    raise ValueError("likelihood_weighting needs continuous time (continuous=True); discrete "
                     "training supports only the default weighting lambda = sigma^2.")
  if not continuous and sde.N < 2:
    raise ValueError(f"Discrete times i / (N - 1) need N >= 2, got N={sde.N}.")
  proposal = likelihood_importance_proposal(sde, eps) if importance_weighting else None

  def loss_fn(key: Array, params: Params, batch: Array) -> tuple[Array, dict[str, Array]]:
    k_t, k_z, k_model = jax.random.split(key, 3)
    b = batch.shape[0]
    # Times and the weight w(t) = lambda(t) / sigma_t^2 (/ (T - eps) q(t) under importance sampling).
    if proposal is not None:
      t, q = proposal(k_t, b)
      weight = _g2_over_sigma2(sde, t) / ((sde.T - eps) * q)
    else:
      if continuous:
        t = jax.random.uniform(k_t, (b,), minval=eps, maxval=sde.T)
      else:
        t = jax.random.randint(k_t, (b,), 0, sde.N) / (sde.N - 1)
      weight = _g2_over_sigma2(sde, t) if likelihood_weighting else jnp.ones_like(t)
    # Perturb the data and score it.
    z = jax.random.normal(k_z, batch.shape, batch.dtype)
    mean, std = sde.marginal_prob(batch, t)
    x_t = mean + sde_lib.batch_mul(std, z)
    score = build_score_fn(params, k_model, train)(x_t, t)
    # Weighted residual sigma_t s + z, reduced per example, then the batch mean.
    per_example = weight * _reduce((sde_lib.batch_mul(std, score) + z) ** 2, reduce_mean)
    return jnp.mean(per_example), {"per_example": per_example, "t": t}

  return loss_fn


def _discrete_loss_fn(noise_table: np.ndarray, signal_table: np.ndarray, n: int,
                      build_score_fn: ScoreFnBuilder, train: bool, reduce_mean: bool) -> LossFn:
  """|| sigma_i s(x_i, t_i) + z ||^2 with x_i = a_i x_0 + sigma_i z, i ~ U{0..N-1}, t_i = i / (N - 1)."""
  sigma_table = jnp.asarray(noise_table, jnp.float32)
  alpha_table = jnp.asarray(signal_table, jnp.float32)

  def loss_fn(key: Array, params: Params, batch: Array) -> tuple[Array, dict[str, Array]]:
    k_i, k_z, k_model = jax.random.split(key, 3)
    i = jax.random.randint(k_i, (batch.shape[0],), 0, n)
    t = i / (n - 1)
    z = jax.random.normal(k_z, batch.shape, batch.dtype)
    x_i = sde_lib.batch_mul(alpha_table[i], batch) + sde_lib.batch_mul(sigma_table[i], z)
    score = build_score_fn(params, k_model, train)(x_i, t)
    per_example = _reduce((sde_lib.batch_mul(sigma_table[i], score) + z) ** 2, reduce_mean)
    return jnp.mean(per_example), {"per_example": per_example, "t": t}

  return loss_fn


def get_class_conditional_loss_fn(make_loss_fn: Callable[[ScoreFnBuilder], LossFn], build_score_fn: Callable, *,
                                  num_classes: int, label_dropout: float = 0.0) -> LossFn:
  """``loss_fn(key, params, {"image", "label"})``: ``make_loss_fn``'s loss with labels bound, each replaced by
  the null class C with probability ``label_dropout`` (classifier-free guidance); a label outside [0, C)
  gives NaN. ``make_loss_fn(build_score_fn) -> loss_fn``; ``k_drop, k_loss = split(key)``."""
  if num_classes < 1:
    raise ValueError(f"Class-conditional training needs num_classes >= 1, got {num_classes}; set "
                     f"config.model.num_classes.")
  if not 0.0 <= label_dropout <= 1.0:
    raise ValueError(f"label_dropout is a probability in [0, 1], got {label_dropout}; set "
                     f"config.training.label_dropout (0.1-0.2 is usual for classifier-free guidance).")

  def loss_fn(key: Array, params: Params, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    k_drop, k_loss = jax.random.split(key)
    y = batch["label"]
    y = jnp.where((y >= 0) & (y < num_classes), y, -1)  # -1 embeds as NaN
    y = jnp.where(jax.random.bernoulli(k_drop, label_dropout, y.shape), num_classes, y)
    bound = lambda p, k, train: build_score_fn(p, k, train, class_labels=y)
    return make_loss_fn(bound)(k_loss, params, batch["image"])

  return loss_fn


def get_classifier_loss_fn(sde: sde_lib.SDE, build_logit_fn: Callable, *, train: bool, eps: float = 1e-5) -> LossFn:
  """``loss_fn(key, params, {"image", "label"}) -> (loss, aux)``: E_t E_z [-log softmax(f(x_t, t))_y],
  t ~ U(eps, T), of a noise-conditional classifier ``build_logit_fn(params, key, train) -> logit_fn``;
  aux adds ``metrics`` {"accuracy"}; a label outside the classes gives NaN."""
  if not 0 < eps < sde.T:
    raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}; set config.training.eps.")

  def loss_fn(key: Array, params: Params, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    k_t, k_z, k_model = jax.random.split(key, 3)
    x_0, y = batch["image"], batch["label"]
    # Perturb the data at t ~ U(eps, T) and classify.
    t = jax.random.uniform(k_t, (x_0.shape[0],), minval=eps, maxval=sde.T)
    z = jax.random.normal(k_z, x_0.shape, x_0.dtype)
    mean, std = sde.marginal_prob(x_0, t)
    logits = build_logit_fn(params, k_model, train)(mean + sde_lib.batch_mul(std, z), t)
    # Cross-entropy; NaN for a label outside the classes.
    valid = (y >= 0) & (y < logits.shape[-1])
    log_p = jax.nn.log_softmax(logits)
    per_example = -jnp.take_along_axis(log_p, jnp.where(valid, y, 0)[:, None], axis=1)[:, 0]
    per_example = jnp.where(valid, per_example, jnp.nan)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
    return jnp.mean(per_example), {"per_example": per_example, "t": t, "metrics": {"accuracy": accuracy}}

  return loss_fn


def _check_discrete(sde: sde_lib.SDE, table: str, loss: str) -> None:
  if not hasattr(sde, table):
    raise ValueError(f"The {loss} loss needs an SDE with the table {table!r}, which {type(sde).__name__} "
                     f"lacks. {_DISCRETE_CHOICES} Use continuous=True for other SDEs.")
  if sde.N < 2:
    raise ValueError(f"The {loss} loss calls the score at t_i = i / (N - 1) and needs N >= 2, got N={sde.N}.")


def get_ddpm_loss_fn(vpsde: sde_lib.VPSDE, build_score_fn: ScoreFnBuilder, *, train: bool,
                     reduce_mean: bool = True) -> LossFn:
  """DDPM (Ho et al. 2020) in score form on the original's table: || sqrt(1 - abar_i) s(x_i, t_i) + z ||^2."""
  _check_discrete(vpsde, "alphas_cumprod", "DDPM")
  return _discrete_loss_fn(vpsde.sqrt_1m_alphas_cumprod, vpsde.sqrt_alphas_cumprod, vpsde.N,
                           build_score_fn, train, reduce_mean)


def get_smld_loss_fn(vesde: sde_lib.VESDE, build_score_fn: ScoreFnBuilder, *, train: bool,
                     reduce_mean: bool = False) -> LossFn:
  """SMLD / NCSN (Song & Ermon 2019) on the original's sigma table: || sigma_i s(x_0 + sigma_i z, t_i) + z ||^2."""
  _check_discrete(vesde, "discrete_sigmas", "SMLD")
  return _discrete_loss_fn(vesde.discrete_sigmas, np.ones_like(vesde.discrete_sigmas), vesde.N,
                           build_score_fn, train, reduce_mean)


# The discrete losses, keyed by the noise table an SDE carries.
_DISCRETE_LOSSES = {"alphas_cumprod": get_ddpm_loss_fn, "discrete_sigmas": get_smld_loss_fn}
_DISCRETE_CHOICES = ("Discrete losses exist for VPSDE (DDPM, get_ddpm_loss_fn) and VESDE "
                     "(SMLD, get_smld_loss_fn); SubVPSDE has none.")


def get_loss_fn(sde: sde_lib.SDE, build_score_fn: ScoreFnBuilder, *, train: bool,
                continuous: bool = True, reduce_mean: bool = True, likelihood_weighting: bool = False,
                importance_weighting: bool = False, eps: float = 1e-5) -> LossFn:
  """Continuous DSM (``get_sde_loss_fn``), or with ``continuous=False`` the original's DDPM (VP) / SMLD (VE) loss."""
  if continuous:
    return get_sde_loss_fn(sde, build_score_fn, train=train, reduce_mean=reduce_mean,
                           likelihood_weighting=likelihood_weighting,
                           importance_weighting=importance_weighting, eps=eps)
  if likelihood_weighting or importance_weighting:
    raise ValueError("likelihood_weighting and importance_weighting need continuous training; "
                     "set continuous=True, or turn both off for the discrete DDPM / SMLD losses.")
  for table, builder in _DISCRETE_LOSSES.items():
    if hasattr(sde, table):
      return builder(sde, build_score_fn, train=train, reduce_mean=reduce_mean)
  raise ValueError(f"{type(sde).__name__} has no discrete loss. {_DISCRETE_CHOICES} "
                   f"Use continuous=True.")


# --- optimiser ----------------------------------------------------------------------------------------


def get_lr_schedule(lr: float, warmup: int) -> optax.Schedule:
  """lr * min(step / warmup, 1): 0 at step 0, linear to ``lr`` at ``warmup``, then constant."""
  if warmup < 0 or int(warmup) != warmup:
    raise ValueError(f"warmup must be a non-negative number of steps (0: none), got {warmup}.")
  return optax.linear_schedule(0.0, lr, int(warmup)) if warmup else optax.constant_schedule(lr)


_OPTIMIZERS = ("adam",)


def get_optimizer(lr: float = 2e-4, beta1: float = 0.9, beta2: float = 0.999, adam_eps: float = 1e-8,
                  weight_decay: float = 0.0, warmup: int = 5000, grad_clip: float = 1.0,
                  optimizer: str = "adam") -> optax.GradientTransformation:
  """Global-norm clipping (off for ``grad_clip < 0``), then Adam at lr min(step / warmup, 1) (the original's
  recipe); ``weight_decay > 0``: decoupled decay as ``flax.optim.Adam`` had (``optax.adamw``)."""
  if optimizer.lower() not in _OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {optimizer!r}; valid choices: {_OPTIMIZERS}.")
  if grad_clip == 0:
    raise ValueError("grad_clip=0 would zero every gradient; use a positive norm, or a negative "
                     "value (e.g. -1) to disable clipping.")
  schedule = get_lr_schedule(lr, warmup)
  if weight_decay > 0:
    adam = optax.adamw(schedule, b1=beta1, b2=beta2, eps=adam_eps, weight_decay=weight_decay)
  elif weight_decay == 0:
    adam = optax.adam(schedule, b1=beta1, b2=beta2, eps=adam_eps)
  else:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
  return adam if grad_clip < 0 else optax.chain(optax.clip_by_global_norm(grad_clip), adam)


# --- train state and step -----------------------------------------------------------------------


class TrainState(struct.PyTreeNode):
  """Everything a training run carries between steps (a frozen pytree; no PRNG key).

  Attributes:
    step: () int32, the number of optimiser steps taken.
    params: the model parameters.
    opt_state: the optimiser state.
    ema_params: exponential moving average of ``params`` (used for evaluation and sampling).
  """

  step: Array
  params: Params
  opt_state: optax.OptState
  ema_params: Params


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0, the optimiser's initial state, and the EMA initialised to (a copy of) ``params``."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    ema_params=jax.tree.map(jnp.copy, params))


def ema_decay(ema_rate: float, num_updates: Array, warmup: bool = False) -> Array:
  """EMA decay of update number ``num_updates`` (1 for the first update).

  ``ema_rate`` without warm-up (the original JAX code); with ``warmup``, the PyTorch port's
  min(ema_rate, (1 + n) / (10 + n)).
  """
  if not warmup:
    return jnp.asarray(ema_rate, jnp.float32)
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(ema_rate, (1.0 + n) / (10.0 + n))


NONFINITE_POLICIES = ("stop", "skip")


def get_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, train: bool,
                ema_rate: float = 0.999, ema_warmup: bool = False, n_jitted_steps: int = 1,
                nonfinite: str = "stop") -> StepFn:
  """``step_fn(base_key, state, batch) -> (state, metrics)``: an optimiser step and EMA update per batch (or,
  ``train=False``, the loss of ``state.ema_params``), batch j's key ``fold_in(base_key, state.step + j)``.

  Args:
    n_jitted_steps: k > 1 scans k batches (leading axis k of every leaf; metrics get one too).
    nonfinite: ``"stop"`` (the caller checks ``metrics["loss"]``) or ``"skip"`` (a non-finite update keeps
      the state, ``metrics["skipped"]`` = 1). Metrics: ``loss``, ``grad_norm`` (before clipping), a loss's
      ``aux["metrics"]`` when evaluating.
  """
  if not 0 <= ema_rate <= 1:
    raise ValueError(f"ema_rate must lie in [0, 1], got {ema_rate}.")
  if n_jitted_steps < 1 or int(n_jitted_steps) != n_jitted_steps:
    raise ValueError(f"n_jitted_steps must be a positive integer, got {n_jitted_steps}.")
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"Unknown non-finite policy {nonfinite!r}; valid choices: {list(NONFINITE_POLICIES)} "
                     f"(config.training.nonfinite).")

  def one_step(key: Array, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Array]]:
    if not train:
      loss, aux = loss_fn(key, state.ema_params, batch)
      return state, {"loss": loss, **aux.get("metrics", {})}
    (loss, _), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(key, state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(ema_rate, state.step + 1, ema_warmup)
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - decay)
    ema_params = jax.tree.map(lambda e, old: e.astype(old.dtype), ema_params, state.ema_params)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, "grad_norm": grad_norm}
    if nonfinite == "skip":  # keep the old values where this update is not finite
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      ema_params = keep(ema_params, state.ema_params)
      metrics["skipped"] = (~finite).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
    return new_state, metrics

  def step_fn(base_key: Array, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Array]]:
    if n_jitted_steps == 1:
      return one_step(jax.random.fold_in(base_key, state.step), state, batch)
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(batch)}
    if sizes != {n_jitted_steps}:
      raise ValueError(f"With n_jitted_steps={n_jitted_steps} every batch leaf needs a leading axis of "
                       f"that size, got leading sizes {sizes}.")
    keys = jax.vmap(lambda j: jax.random.fold_in(base_key, state.step + j))(jnp.arange(n_jitted_steps))
    return jax.lax.scan(lambda s, kb: one_step(kb[0], s, kb[1]), state, (keys, batch))

  return step_fn


# --- EDM training loss ---------------------------------------------------------------------------------


def get_edm_loss_fn(sde: sde_lib.SDE, build_score_fn: ScoreFnBuilder, *, train: bool,
                    sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                    reduce_mean: bool = True, eps: float = 1e-5) -> LossFn:
  """EDM's loss (Karras et al. 2022): E lambda(sigma~) || D(x_0 + sigma~ n; sigma~) - x_0 ||^2, ln sigma~ ~
  N(p_mean, p_std^2), lambda = 1 / c_out^2, sigma~ mapped to the SDE's time (clipped to [eps, T]); D is
  Tweedie's denoiser of the score."""
  if not 0 < eps < sde.T:
    raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}.")
  if not (sigma_data > 0 and p_std > 0):
    raise ValueError(f"sigma_data and p_std must be positive, got sigma_data={sigma_data}, p_std={p_std}.")
  precond = edm_lib.EDMPreconditioning(sigma_data)

  def loss_fn(key: Array, params: Params, batch: Array) -> tuple[Array, dict[str, Array]]:
    k_sigma, k_n, k_model = jax.random.split(key, 3)
    b = batch.shape[0]
    # Noise levels ln sigma~ ~ N(p_mean, p_std^2), as times of the SDE.
    log_sigma = p_mean + p_std * jax.random.normal(k_sigma, (b,))
    t = noise_levels.t_of_lambda(sde, -log_sigma, eps, sde.T)
    alpha, sigma = sde.alpha_sigma(t)
    # Perturb, denoise, and weight by 1 / c_out^2.
    n = jax.random.normal(k_n, batch.shape, batch.dtype)
    x_t = sde_lib.batch_mul(alpha, batch) + sde_lib.batch_mul(sigma, n)
    score = build_score_fn(params, k_model, train)(x_t, t)
    denoised = edm_lib.denoiser_from_score(score, x_t, alpha, sigma)
    per_example = precond.loss_weight(sigma / alpha) * _reduce((denoised - batch) ** 2, reduce_mean)
    return jnp.mean(per_example), {"per_example": per_example, "t": t}

  return loss_fn
