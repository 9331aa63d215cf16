"""Log-likelihoods, latents and bits/dim from the probability-flow ODE, on device.

    lik = get_likelihood_fn(sde, divergence="rademacher", rtol=1e-5, atol=1e-5, eps=1e-5)
    logp, z, nfe = lik(key, score_fn, x)        # log p_eps(x) (B,) nats; z = x_T; nfe of the augmented ODE

log p_eps(x) = log p_T(x_T) + int_eps^T div f~(x_t, t) dt along dx/dt = f~ = f - g^2 s / 2, solved per
sample with diffrax; the divergence is exact or Hutchinson's. Derivation and conventions: ``docs/likelihood.md``.
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
                      solver: str = "tsit5", max_steps: int = ode.MAX_STEPS) -> Callable:
  """``lik(key, score_fn, x (B, ...)) -> (log p_eps(x) (B,) nats, z = x_T, nfe)``, x in model space.

  Args:
    divergence: one of ``DIVERGENCES`` (``exact``: D JVPs per evaluation, small D only).
    rtol, atol: per-sample tolerances (on x and on the divergence integral).
    num_probes: Hutchinson probes per sample (1 for ``exact``); ``key`` draws them (``exact`` takes None).
    solver, max_steps: the diffrax solver (``ode.SOLVERS``) and its per-sample step budget.
  """
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

    def velocity(t, state, u):  # f~ and u^T (df~/dx) u from one linearisation
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
                  solver: str = "tsit5", max_steps: int = ode.MAX_STEPS) -> Callable:
  """``encode(score_fn, x (B, ...)) -> (z = x_T (B, ...), nfe)``: the PF-ODE from eps to T, the inverse of
  ``get_ode_sampler(..., eps=eps)`` decoding ``z=``."""
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
  """-logp (B,) / (D ln 2) + offset: offset = 8 - log2|ds/du| for 8-bit data dequantised to [0, 1) and
  scaled by s (8 for [0, 1] data, 7 for [-1, 1])."""
  return -logp / (dim * math.log(2.0)) + offset


@jax.jit
def dequantize(key: Array, images: Array) -> Array:
  """u = (x + U[0, 1)) / 256 (B, ...) float32 of integer images x in 0..255; image i's noise from fold_in(key, i)."""
  images = eqx.error_if(images, (jnp.min(images) < 0) | (jnp.max(images) > 255),
                        "bits/dim needs 8-bit images with values in 0..255.")
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
  noise = jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:]))(keys)
  return (images.astype(jnp.float32) + noise) / 256.0


def get_bpd_fn(sde: sde_lib.SDE, data_scaler: Callable[[Array], Array] | None = None,
               **likelihood_kwargs) -> Callable:
  """``bpd_fn(key, score_fn, integer images (B, ...)) -> (bits/dim (B,), z, nfe)`` of uniformly dequantised data.

  ``data_scaler`` maps [0, 1] to model space elementwise (its log-Jacobian enters the density);
  ``k_deq, k_lik = split(key)`` draw the dequantisation and the probes; ``likelihood_kwargs`` go to
  ``get_likelihood_fn``.
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
