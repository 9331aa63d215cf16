"""Log-likelihoods, latents and bits/dim from the probability-flow ODE, computed on device.

The probability-flow ODE dx/dt = f~(x, t) = f(x, t) - g(t)^2 / 2 * s(x, t) carries p_eps to p_T,
and along a trajectory (instantaneous change of variables)

    d log p_t(x_t) / dt = -div f~(x_t, t),   so   log p_eps(x) = log p_T(x_T) + int_eps^T div f~ dt.

``get_likelihood_fn`` integrates the augmented state [x, int div f~] from eps to T with an adaptive
diffrax solver, per sample (``jax.vmap``, so each sample has its own steps), and returns
log p_eps(x) in nats, with the prior p_T standing in for the true p_T (as in the original).

Divergence. Each function evaluation makes one linearisation of f~ at x (one forward pass; the
Jacobian-vector products reuse it) and contracts it with probe vectors u_p:

    div f~ ~= sum_p u_p^T (df~/dx) u_p,   with E[sum_p u_p u_p^T] = I.

* ``exact``: u_p the D standard basis vectors (the sum is the trace); D JVPs per evaluation, so
  for small D only (toy data, tests).
* ``rademacher`` / ``gaussian``: Hutchinson-Skilling, u_p = v_p / sqrt(P) for ``num_probes`` = P
  i.i.d. Rademacher or standard normal v_p. The probes are drawn once per sample per call
  (``fold_in(key, i)`` for sample i) and held fixed along the trajectory, so the integral is an
  unbiased estimate of int div f~ dt (the maintainers' argument, score_sde_pytorch#10; resampling
  per evaluation would make the ODE rough and stall the adaptive solver).

Bits/dim. ``get_bpd_fn`` takes 8-bit images, dequantises them, u = (x + U[0, 1)) / 256, maps u to
model space with ``data_scaler`` and returns -log2 p(u) / D + 8, the standard continuous bound on
the discrete model's bits/dim (8 = log2 256; for an affine scaler the change of variables gives
the original's offset, 8 - log2|ds/du|: 7 for data centred to [-1, 1]). ``nats_to_bpd`` does the
conversion for callers who dequantise themselves.

    lik = get_likelihood_fn(sde, divergence="rademacher", rtol=1e-5, atol=1e-5, eps=1e-5)
    logp, z, nfe = lik(key, score_fn, x)

``nfe`` counts function evaluations of the augmented ODE, each one batched forward pass of the
score model plus its JVPs, as the maximum over samples (see ``score_sde.sampling.ode``).
"""

from __future__ import annotations

import math
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib
from score_sde.sampling import ode

Array = jax.Array


def _basis(key: Array, event_shape: tuple[int, ...], num_probes: int) -> Array:
  """The D standard basis vectors, (D, *event_shape): the exact trace."""
  del key, num_probes
  d = math.prod(event_shape)
  return jnp.eye(d, dtype=jnp.float32).reshape((d,) + event_shape)


def _rademacher(key: Array, event_shape: tuple[int, ...], num_probes: int) -> Array:
  """(P, *event_shape) Rademacher probes scaled by 1 / sqrt(P)."""
  v = jax.random.rademacher(key, (num_probes,) + event_shape, dtype=jnp.float32)
  return v / math.sqrt(num_probes)


def _gaussian(key: Array, event_shape: tuple[int, ...], num_probes: int) -> Array:
  """(P, *event_shape) standard normal probes scaled by 1 / sqrt(P)."""
  return jax.random.normal(key, (num_probes,) + event_shape) / math.sqrt(num_probes)


# Probe vectors u_p (P, *event_shape) with E[sum_p u_p u_p^T] = I, by divergence name.
DIVERGENCES: dict[str, Callable[[Array, tuple[int, ...], int], Array]] = {
    "exact": _basis,
    "rademacher": _rademacher,
    "gaussian": _gaussian,
}


def _check_data(x: Array, what: str) -> Array:
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"{what} must be a batch of shape (B, ...) with at least 2 axes, got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{what} must be floating-point data in model space, got dtype {x.dtype}; for 8-bit images "
        "use get_bpd_fn, which dequantises them.")
  return x


def _pf_drift(sde: sde_lib.SDE, score_fn: sde_lib.ScoreFn) -> Callable[[Array, Array], Array]:
  """f~(x, t) = f - g^2 s / 2 for one sample: x (...), t scalar."""
  return ode.single(lambda x, t: sde.reverse(score_fn, probability_flow=True).sde(x, t)[0])


def get_likelihood_fn(sde: sde_lib.SDE, divergence: str = "rademacher", rtol: float = 1e-5,
                      atol: float = 1e-5, eps: float = 1e-5, num_probes: int = 1,
                      solver: str = "tsit5", max_steps: int = ode.MAX_STEPS, **unknown) -> Callable:
  """Builds ``lik(key, score_fn, x) -> (logp, z, nfe)``, the PF-ODE log-density of x at time eps.

  Args:
    sde: the forward SDE the score function belongs to.
    divergence: one of ``DIVERGENCES``: ``exact`` (D JVPs per evaluation; small D only),
      ``rademacher`` or ``gaussian`` (Hutchinson-Skilling, unbiased).
    rtol, atol: per-sample tolerances of the adaptive solver (on x and on the divergence integral).
    eps: the starting time; logp is the density of the model's p_eps.
    num_probes: Hutchinson probes averaged per sample (one forward pass, ``num_probes`` JVPs per
      evaluation); must be 1 for ``exact``.
    solver: one of ``ode.SOLVERS``.
    max_steps: step budget per sample; exhausting it raises a runtime error.
    **unknown: rejected with a ``ValueError`` naming the valid options.

  Returns:
    ``lik(key, score_fn, x)`` with x (B, ...) floating-point data in model space, returning
    logp (B,) in nats, the latent z = x_T (B, ...), and nfe (int32 scalar): evaluations of the
    augmented ODE, the maximum over samples. ``key`` draws the probes (``exact`` takes None).
  """
  ode.reject_unknown(get_likelihood_fn, unknown, "the likelihood")
  if divergence not in DIVERGENCES:
    raise ValueError(f"Unknown divergence {divergence!r}; valid choices: {sorted(DIVERGENCES)}.")
  if int(num_probes) != num_probes or num_probes < 1:
    raise ValueError(f"num_probes must be a positive integer, got {num_probes}.")
  if divergence == "exact" and num_probes != 1:
    raise ValueError("num_probes applies to the Hutchinson estimators ('rademacher', 'gaussian'); "
                     "'exact' always uses the D basis vectors, so leave num_probes=1.")
  ode.check_tolerances(rtol, atol, eps, max_steps, sde.T)
  ode_solver = ode.get_solver(solver)
  probes_fn = DIVERGENCES[divergence]

  @eqx.filter_jit
  def lik(key, score_fn, x):
    batch, event_shape = x.shape[0], x.shape[1:]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    probes = jax.vmap(lambda k: probes_fn(k, event_shape, num_probes))(keys).astype(x.dtype)
    drift = _pf_drift(sde, score_fn)

    def velocity(t, state, u):
      # One linearisation of f~ at x; the divergence contracts its JVPs with the probes u (P, ...).
      f, jvp = jax.linearize(lambda y: drift(y, t), state[0])
      return f, jnp.sum(u * jax.vmap(jvp)(u))

    y0 = (x, jnp.zeros((batch,), x.dtype))
    (z, delta_logp), nfe = ode.solve_per_sample(velocity, y0, probes, eps, sde.T, solver=ode_solver,
                                                rtol=rtol, atol=atol, max_steps=max_steps)
    return sde.prior_logp(z) + delta_logp, z, jnp.max(nfe)

  def likelihood_fn(key: Array | None, score_fn: sde_lib.ScoreFn, x: Array) -> tuple[Array, Array, Array]:
    if key is None:
      if divergence != "exact":
        raise ValueError(f"The {divergence!r} divergence draws random probes: pass a PRNG key.")
      key = jax.random.key(0)  # unused by the basis probes
    return lik(key, score_fn, _check_data(x, "x"))

  return likelihood_fn


def get_encode_fn(sde: sde_lib.SDE, rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3,
                  solver: str = "tsit5", max_steps: int = ode.MAX_STEPS, **unknown) -> Callable:
  """Builds ``encode(score_fn, x) -> (z, nfe)``: data at time eps to latents at T by the PF-ODE.

  The inverse of the ODE sampler's decoding, ``get_ode_sampler(sde, x.shape, eps=eps, ...)``
  called with ``z=``; use the same ``eps`` (the default matches the sampler's).

  Args:
    sde: the forward SDE the score function belongs to.
    rtol, atol: per-sample tolerances of the adaptive solver.
    eps: the time the data live at.
    solver: one of ``ode.SOLVERS``.
    max_steps: step budget per sample; exhausting it raises a runtime error.
    **unknown: rejected with a ``ValueError`` naming the valid options.

  Returns:
    ``encode(score_fn, x)`` with x (B, ...) floating-point, returning z (B, ...) and nfe (int32
    scalar, the maximum over samples of the score evaluations).
  """
  ode.reject_unknown(get_encode_fn, unknown, "the encoder")
  ode.check_tolerances(rtol, atol, eps, max_steps, sde.T)
  ode_solver = ode.get_solver(solver)

  @eqx.filter_jit
  def encode(score_fn, x):
    drift = _pf_drift(sde, score_fn)
    z, nfe = ode.solve_per_sample(lambda t, y, _: drift(y, t), x, None, eps, sde.T, solver=ode_solver,
                                  rtol=rtol, atol=atol, max_steps=max_steps)
    return z, jnp.max(nfe)

  def encode_fn(score_fn: sde_lib.ScoreFn, x: Array) -> tuple[Array, Array]:
    return encode(score_fn, _check_data(x, "x"))

  return encode_fn


def nats_to_bpd(logp: Array, dim: int, offset: float) -> Array:
  """Bits/dim -logp / (D ln 2) + offset from a log-density in nats of dequantised data.

  Args:
    logp: (B,) natural-log densities of the model-space data.
    dim: D, the number of dimensions of one example.
    offset: 8 - log2|ds/du| for 8-bit data dequantised to u in [0, 1) and mapped to model space by
      an affine scaler s: 8 for [0, 1] data, 7 for data centred to [-1, 1].
  """
  return -logp / (dim * math.log(2.0)) + offset


@jax.jit
def dequantize(key: Array, images: Array) -> Array:
  """Uniform dequantisation of 8-bit images: u = (x + U[0, 1)) / 256, in [0, 1).

  Args:
    key: PRNG key; image i uses ``fold_in(key, i)``, so its noise does not depend on the batch.
    images: (B, ...) integer array with values in 0..255 (checked at run time).

  Returns:
    u (B, ...) float32.
  """
  images = eqx.error_if(images, (jnp.min(images) < 0) | (jnp.max(images) > 255),
                        "bits/dim needs 8-bit images with values in 0..255.")
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
  noise = jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:]))(keys)
  return (images.astype(jnp.float32) + noise) / 256.0


def get_bpd_fn(sde: sde_lib.SDE, data_scaler: Callable[[Array], Array] | None = None,
               **likelihood_kwargs) -> Callable:
  """Builds ``bpd_fn(key, score_fn, images) -> (bpd, z, nfe)`` for 8-bit images.

  Args:
    sde: the forward SDE the score function belongs to.
    data_scaler: elementwise map from [0, 1] to model space (e.g. ``lambda u: 2 * u - 1`` for
      centred data); identity by default. Its log-Jacobian enters the density, so any elementwise
      differentiable map is handled exactly (for an affine one this is the offset 8 - log2|ds/du|).
    **likelihood_kwargs: options of ``get_likelihood_fn`` (divergence, rtol, atol, eps, ...).

  Returns:
    ``bpd_fn(key, score_fn, images)`` with integer images (B, H, W, C) (uint8, or ints in 0..255),
    returning bits/dim (B,) of the uniformly dequantised images, the latents z (B, H, W, C) and the
    nfe of the likelihood solve. ``k_deq, k_lik = jax.random.split(key)``: ``dequantize(k_deq,
    images)`` gives u, ``k_lik`` the probes. Floating-point input raises ``ValueError``.
  """
  scaler = (lambda u: u) if data_scaler is None else data_scaler
  lik = get_likelihood_fn(sde, **likelihood_kwargs)

  @eqx.filter_jit
  def to_model_space(key, images):
    u = dequantize(key, images)
    x, ds_du = jax.jvp(scaler, (u,), (jnp.ones_like(u),))
    return x, jnp.sum(jnp.log(jnp.abs(ds_du)).reshape(u.shape[0], -1), axis=1)

  def bpd_fn(key: Array, score_fn: sde_lib.ScoreFn, images: Array) -> tuple[Array, Array, Array]:
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.integer):
      raise ValueError(
          f"bits/dim needs 8-bit integer images (uint8, or ints in 0..255), got dtype {images.dtype}; "
          "for continuous data use get_likelihood_fn (log-density in nats), or nats_to_bpd if you "
          "dequantised the images yourself.")
    if images.ndim < 2:
      raise ValueError(f"images must have shape (B, H, W, C), got {images.shape}.")
    k_deq, k_lik = jax.random.split(key)
    x, log_det = to_model_space(k_deq, images)
    logp, z, nfe = lik(k_lik, score_fn, x)
    # log p(u) = log p(x) + log|ds/du|; 8 = log2 256 turns the density of u into bits per level.
    return nats_to_bpd(logp + log_det, math.prod(images.shape[1:]), 8.0), z, nfe

  return bpd_fn


__all__ = ["DIVERGENCES", "dequantize", "get_bpd_fn", "get_encode_fn", "get_likelihood_fn", "nats_to_bpd"]
