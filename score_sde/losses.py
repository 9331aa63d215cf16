"""Training objectives, optimiser, train state and the train / eval step.

Losses never see a network. They see a *score-function builder*

    build_score_fn(params, key, train) -> score_fn(x, t)

that turns parameters into a score function s_theta(x, t) ~ grad_x log p_t(x) (``key`` feeds
dropout when ``train``). The model wrapper is the only code that knows whether a network predicts
noise, the score or x_0, and how it is conditioned on t; every loss below is written in terms of
the score.

Denoising score matching (Song et al. 2021, eq. 7). With x_t = alpha_t x_0 + sigma_t z,

    L(theta) = E_t E_{x_0} E_z [ lambda(t) || s_theta(x_t, t) + z / sigma_t ||^2 ]
             = E_t E_{x_0} E_z [ w(t) || sigma_t s_theta(x_t, t) + z ||^2 ],   w = lambda / sigma_t^2.

* default: lambda = sigma_t^2 (w = 1), t ~ U(eps, T);
* ``likelihood_weighting``: lambda = g(t)^2 (w = g^2 / sigma^2), which makes the objective an upper
  bound on the negative log-likelihood (Song, Durkan, Murray & Ermon 2021);
* ``importance_weighting``: the likelihood-weighted objective with t drawn from a proposal
  q(t) ~ g(t)^2 / sigma_t^2 on [eps, T] and weight w = g^2 / (sigma^2 (T - eps) q(t)), unbiased for
  the likelihood-weighted objective and nearly constant, so its variance is far lower. The
  proposal is tabulated from the SDE itself (``likelihood_importance_proposal``), so it serves
  every SDE.

Discrete losses of the original (labels i ~ U{0, ..., N-1}, the score called at t_i = i / (N - 1)):
DDPM for VP (the noise table sqrt(1 - alphabar_i)) and SMLD for VE (the sigma table).

Class-conditional training. ``get_class_conditional_loss_fn`` trains s_theta(x, t | y) with any of
the losses above on batches {"image", "label"}, replacing each label by the null class with
probability ``label_dropout`` so that one network also learns the unconditional score
(classifier-free guidance, Ho & Salimans 2022). ``get_classifier_loss_fn`` trains a
noise-conditional classifier p_phi(y | x_t, t) by cross-entropy on x_t = alpha_t x_0 + sigma_t z,
t ~ U(eps, T), for classifier guidance.

Per-example reduction: mean over dimensions (``reduce_mean``) or 0.5 * sum (the original's
default); then a plain ``jnp.mean`` over the batch, so every function here runs unchanged under
``jax.jit`` with a sharded batch (no device axis is ever named).

Shapes: a batch is an array x_0 of shape (B, ...) in model space (already scaled).
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
  """A proposal q(t) ~ g(t)^2 / sigma_t^2 on [eps, T], tabulated once from the SDE.

  [eps, T] is split into ``num_cells`` geometric cells (the density behaves like 1/t near 0 for VP
  and subVP and is constant for VE, so geometric cells hold similar masses); each cell's mass is the
  trapezoidal integral of g^2 / sigma^2. The proposal is the piecewise-constant density with those
  masses: t is drawn by inverting its piecewise-linear CDF, and ``sample`` returns the exact density
  q(t) of this procedure, so an estimator weighted by 1 / q is unbiased whatever the tabulation
  error (which only costs variance).

  Args:
    sde: any SDE of ``score_sde.sde``.
    eps: smallest time, 0 < eps < T.
    num_cells: number of cells of the table.

  Returns:
    ``sample(key, n) -> (t, q)``, each (n,): times in [eps, T] and their proposal density.
  """
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
  """Denoising score matching for any SDE: E w(t) || sigma_t s_theta(x_t, t) + z ||^2.

  Args:
    sde: the forward SDE.
    build_score_fn: ``build_score_fn(params, key, train) -> score_fn``.
    train: passed to ``build_score_fn`` (dropout on or off).
    reduce_mean: mean over dimensions per example, else 0.5 * sum.
    continuous: t ~ U(eps, T). ``False`` draws t from the N-point grid i / (N - 1) that a network
      conditioned on a discrete index sees (with the SDE's own marginals; the original's DDPM / SMLD
      tables are ``get_ddpm_loss_fn`` / ``get_smld_loss_fn``).
    likelihood_weighting: lambda(t) = g(t)^2 instead of sigma_t^2 (needs ``continuous``).
    importance_weighting: draw t from q ~ g^2 / sigma^2 and reweight; needs
      ``likelihood_weighting``.
    eps: smallest time, 0 < eps < T.

  Returns:
    ``loss_fn(key, params, batch) -> (loss, {"per_example": (B,), "t": (B,)})``.
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
    # Times and the weight w(t) = lambda(t) / sigma_t^2 (divided by (T - eps) q(t) under importance sampling).
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
  """A score-matching loss of a class-conditional network, on batches {"image", "label"}.

  Each label y in {0..C-1} is replaced by the null class C with probability ``label_dropout``
  (Ho & Salimans 2022), then bound to the network, and ``make_loss_fn``'s loss runs on the images
  with the rest of the key: ``k_drop, k_loss = split(key)``. With ``label_dropout = 1`` the loss is
  therefore exactly the unconditional (null-class) model's loss under ``k_loss``. A label outside
  [0, C) makes the loss NaN (the training loop stops and names the step), never a wrong class.

  Args:
    make_loss_fn: ``make_loss_fn(build_score_fn) -> loss_fn(key, params, images)``, e.g.
      ``lambda b: get_loss_fn(sde, b, train=True)``.
    build_score_fn: ``build_score_fn(params, key, train, class_labels=y) -> score_fn``
      (``models.wrapper.get_score_fn_builder``).
    num_classes: C; the null class is C.
    label_dropout: probability of training on the null class instead of the label, in [0, 1].

  Returns:
    ``loss_fn(key, params, {"image": (B, ...), "label": (B,) int}) -> (loss, aux)``.
  """
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
  """Cross-entropy of a noise-conditional classifier on perturbed data, for every SDE.

  L(phi) = E_t E_{x_0, y} E_z [ -log softmax(f_phi(x_t, t))_y ],  x_t = alpha_t x_0 + sigma_t z,
  t ~ U(eps, T): the classifier learns p(y | x_t) at every noise level a sampler visits. (Under
  VE, sigma_t is log-uniform on [sigma(eps), sigma_max].)

  Args:
    sde: the forward SDE (that of the score model the classifier will guide).
    build_logit_fn: ``build_logit_fn(params, key, train) -> logit_fn(x, t) (B, num_classes)``
      (``models.wrapper.get_logit_fn_builder``).
    train: passed to ``build_logit_fn``.
    eps: smallest time, 0 < eps < T.

  Returns:
    ``loss_fn(key, params, {"image": (B, ...), "label": (B,) int}) -> (loss, aux)``; aux holds
    ``per_example`` and ``t`` (B,) and ``metrics`` {"accuracy": ()} (of the batch, at its times).
    A label outside [0, num_classes) makes its loss NaN.
  """
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
  """The DDPM loss (Ho et al. 2020) in score form, on the original's table of N levels.

  x_i = sqrt(alphabar_i) x_0 + sqrt(1 - alphabar_i) eps and the loss is
  || sqrt(1 - alphabar_i) s(x_i, t_i) + eps ||^2, which is || eps_theta - eps ||^2 for a
  noise-predicting network (its discrete wrapper maps t_i back to the label round(t_i (N - 1))).

  Returns:
    ``loss_fn(key, params, batch) -> (loss, {"per_example": (B,), "t": (B,)})``.
  """
  _check_discrete(vpsde, "alphas_cumprod", "DDPM")
  return _discrete_loss_fn(vpsde.sqrt_1m_alphas_cumprod, vpsde.sqrt_alphas_cumprod, vpsde.N,
                           build_score_fn, train, reduce_mean)


def get_smld_loss_fn(vesde: sde_lib.VESDE, build_score_fn: ScoreFnBuilder, *, train: bool,
                     reduce_mean: bool = False) -> LossFn:
  """The SMLD / NCSN loss (Song & Ermon 2019) on the original's table of N noise levels.

  x_i = x_0 + sigma_i z with sigma_i ascending in t_i = i / (N - 1); the target is -z / sigma_i and
  the weight sigma_i^2, i.e. || sigma_i s(x_i, t_i) + z ||^2.

  Returns:
    ``loss_fn(key, params, batch) -> (loss, {"per_example": (B,), "t": (B,)})``.
  """
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
  """The training loss of a config: continuous DSM, or the discrete DDPM (VP) / SMLD (VE) loss.

  ``continuous=False`` picks the original's discrete loss for the SDE's table; weighting options
  and ``eps`` apply to continuous training only.
  """
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


def get_optimizer(lr: float = 2e-4, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 0.0, warmup: int = 5000, grad_clip: float = 1.0,
                  optimizer: str = "adam") -> optax.GradientTransformation:
  """Adam with linear lr warm-up and global-norm gradient clipping (the original's recipe).

  Gradients are clipped to global norm ``grad_clip`` (skipped when ``grad_clip < 0``), then Adam
  runs with lr * min(step / warmup, 1). ``weight_decay > 0`` decays weights decoupled from the
  gradient, p <- p - lr (adam + weight_decay p), as ``flax.optim.Adam`` did (``optax.adamw``).
  The learning rate is a closure, not state: a resumed run follows the current config.
  """
  if optimizer.lower() not in _OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {optimizer!r}; valid choices: {_OPTIMIZERS}.")
  if grad_clip == 0:
    raise ValueError("grad_clip=0 would zero every gradient; use a positive norm, or a negative "
                     "value (e.g. -1) to disable clipping.")
  schedule = get_lr_schedule(lr, warmup)
  if weight_decay > 0:
    adam = optax.adamw(schedule, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)
  elif weight_decay == 0:
    adam = optax.adam(schedule, b1=beta1, b2=beta2, eps=eps)
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
  """A pure train (or eval) step, ``step_fn(base_key, state, batch) -> (new_state, metrics)``.

  The key of the j-th batch of a call is ``fold_in(base_key, state.step + j)``: in training that is
  the step number, so resuming from a checkpoint replays the same randomness. Training takes one
  optimiser step per batch and updates the EMA,
  ema <- decay ema + (1 - decay) params (``optax.incremental_update``). Evaluation
  (``train=False``) computes the loss on ``state.ema_params`` and returns the state unchanged; use
  a different ``base_key`` from training's.

  Jit it with the state donated, ``jax.jit(step_fn, donate_argnums=1)``. With ``nonfinite="stop"``
  non-finite losses are the caller's to check (``metrics["loss"]``). With ``"skip"``, a step whose
  loss or gradient norm is not finite keeps the parameters, optimiser state and EMA as they were
  (the step count still advances, so the next step draws fresh randomness), decided on device,
  and ``metrics["skipped"]`` is 1 for it (0 otherwise). Evaluation also reports the scalars of the
  loss's ``aux["metrics"]``, if any (a classifier's accuracy).

  Args:
    loss_fn: ``loss_fn(key, params, batch) -> (loss, aux)``.
    optimizer: an optax transformation (``get_optimizer``).
    train: update the state, or only evaluate.
    ema_rate: EMA decay in [0, 1].
    ema_warmup: the PyTorch port's decay warm-up (``ema_decay``).
    n_jitted_steps: batches per call. With k > 1 every leaf of ``batch`` has a leading axis of size
      k and the k steps run in one ``lax.scan``; metrics then have a leading axis k.
    nonfinite: ``"stop"`` (apply every update; the caller stops) or ``"skip"`` (drop non-finite updates).

  Returns:
    ``step_fn``; metrics hold ``loss`` (and ``grad_norm``, before clipping, when training, and
    ``skipped`` with ``nonfinite="skip"``).
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
  """EDM's training loss (Karras et al. 2022, Sec. 5) for any SDE and any score function.

  In the VE view y = x / alpha_t with noise level sigma~ = sigma_t / alpha_t:

      L = E_{sigma~} E_{x_0} E_n [ lambda(sigma~) || D_theta(x_0 + sigma~ n; sigma~) - x_0 ||^2 ],

  ln sigma~ ~ N(p_mean, p_std^2), lambda = 1 / c_out^2 = (sigma~^2 + sigma_d^2) / (sigma~ sigma_d)^2.
  Each sigma~ is mapped to the SDE's time t with lambda_t = -log sigma~ (bisection,
  ``noise_levels.t_of_lambda``; levels outside [sigma~(eps), sigma~(T)] are clipped to the SDE's
  range, and the loss uses the level of the clipped t); then x_t = alpha_t (x_0 + sigma~ n) and the
  denoiser is Tweedie's D = (x_t + sigma_t^2 s_theta(x_t, t)) / alpha_t. With an EDM-preconditioned
  network (``models.edm.get_edm_score_fn_builder``) this is EDM's loss exactly, and the effective
  target of the network F has unit weight; any other score model trains under the same objective.

  Args:
    sde: the forward SDE.
    build_score_fn: ``build_score_fn(params, key, train) -> score_fn``.
    train: passed to ``build_score_fn``.
    sigma_data: sigma_d, the data's standard deviation (0.5 for images in [-1, 1]).
    p_mean, p_std: the log-normal distribution of sigma~ (EDM: -1.2, 1.2).
    reduce_mean: mean over dimensions per example, else 0.5 * sum.
    eps: smallest time, 0 < eps < T.

  Returns:
    ``loss_fn(key, params, batch) -> (loss, {"per_example": (B,), "t": (B,)})``.
  """
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
