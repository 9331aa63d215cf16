"""Sample-quality metrics on Inception features: FID, KID and the Inception score.

All three take the outputs of the FID Inception (``score_sde.models.inception``): pool3 features
(N, 2048) and logits (N, 1008). The matrix maths runs in float64 numpy/scipy on the host; only the
network runs on device.

* Frechet distance (Heusel et al. 2017) between Gaussians N(mu1, S1), N(mu2, S2):
      d^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2,
  using tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2, whose argument is symmetric positive
  semi-definite: two symmetric eigendecompositions, no complex ``sqrtm`` and no eps retries.
* KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3,
      MMD^2 = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2,
  averaged over ``num_subsets`` random subsets of ``subset_size`` features drawn without replacement
  from each set (the protocol of the KID reference code; the original score_sde used TF-GAN's
  disjoint blocks of 1024 instead).
* Inception score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)) from softmax(logits), on
  ``num_splits`` consecutive splits, as mean and standard deviation over splits. One split (the
  default) is what the original score_sde reported (TF-GAN's ``classifier_score_from_logits``);
  ten is Salimans et al.'s protocol.

Reference statistics are ``.npz`` files with ``mu`` (2048,), ``sigma`` (2048, 2048) and optionally
``features`` (N, 2048) for KID. Files of the original implementation (key ``pool_3``: the features)
load too. ``FeatureStats`` accumulates mean and covariance over batches in float64 with Chan et
al.'s pairwise update, so any number of examples is used exactly once, and two hosts' statistics
merge exactly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import scipy.linalg
import scipy.special


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
  w, v = scipy.linalg.eigh(a, driver="evd")   # divide and conquer: the fastest at d = 2048
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: means, shape (d,).
    sigma1, sigma2: covariances, shape (d, d), symmetric positive semi-definite.

  Returns:
    FID when the statistics are those of pool3 features; >= 0.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"Mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}.")
  s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
  root1 = _sqrt_psd(s1)
  middle = root1 @ s2 @ root1
  eigenvalues = scipy.linalg.eigvalsh((middle + middle.T) / 2)
  tr_covmean = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  diff = mu1 - mu2
  return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def frechet_distance_of_features(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
  """``frechet_distance`` of the Gaussian fit of ``features`` (n, d) to N(mu, sigma), exactly, in O(n^2 d + n d^2).

  With X the centred features, the samples' covariance is S = X^T X / (n - 1), and the non-zero
  eigenvalues of sigma^1/2 S sigma^1/2 are those of the n x n matrix X sigma X^T / (n - 1), so the
  trace term needs no d x d square root: the fast path when n < d (e.g. a few hundred samples
  against 2048 features), and the same number as ``frechet_distance`` up to rounding.
  """
  x = np.asarray(features, np.float64)
  n = x.shape[0]
  if n < 2:
    raise ValueError(f"A covariance needs at least 2 samples, got {n}.")
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  mean = x.mean(axis=0)
  xc = x - mean
  small = xc @ ((sigma + sigma.T) / 2) @ xc.T / (n - 1)
  tr_covmean = np.sum(np.sqrt(np.clip(scipy.linalg.eigvalsh((small + small.T) / 2), 0.0, None)))
  tr_s = np.sum(xc * xc) / (n - 1)
  diff = mean - mu
  return float(max(diff @ diff + tr_s + np.trace(sigma) - 2.0 * tr_covmean, 0.0))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """k(x, y) = (x.y / d + 1)^3 for rows x (n, d) and y (m, d) -> (n, m)."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of two equally sized samples x, y (m, d) with ``polynomial_kernel``."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m = x.shape[0]
  if y.shape[0] != m or m < 2:
    raise ValueError(f"mmd2_unbiased needs two samples of equal size >= 2, got {x.shape} and {y.shape}.")
  k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.sum() / m**2)


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """KID: unbiased polynomial-kernel MMD^2, averaged over random subsets.

  Args:
    features1, features2: pool3 features, shapes (n1, d) and (n2, d).
    num_subsets: subsets drawn.
    subset_size: features per subset and per set (capped at min(n1, n2)).
    seed: seed of the subset draws, so the estimate is reproducible.

  Returns:
    (mean, standard deviation) of MMD^2 over the subsets.
  """
  features1, features2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  m = min(subset_size, features1.shape[0], features2.shape[0])
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(features1[rng.choice(features1.shape[0], m, replace=False)],
                          features2[rng.choice(features2.shape[0], m, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def inception_score(logits: np.ndarray, num_splits: int = 1) -> tuple[float, float]:
  """Inception score exp E_x KL(p(y|x) || p(y)) of classifier logits (N, classes).

  Args:
    logits: the Inception's logits, one row per sample.
    num_splits: consecutive splits scored separately (N // num_splits or one more samples each).

  Returns:
    (mean, standard deviation) over the splits (std 0 for one split).
  """
  log_p = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=1)
  scores = []
  for part in np.array_split(log_p, num_splits):
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Running count, mean and scatter matrix of feature vectors, in float64.

  Attributes:
    n: vectors seen.
    mean: their mean, shape (d,).
    m2: sum of (x - mean)(x - mean)^T, shape (d, d).
  """
  n: int
  mean: np.ndarray
  m2: np.ndarray

  @classmethod
  def empty(cls, dim: int) -> FeatureStats:
    return cls(0, np.zeros(dim), np.zeros((dim, dim)))

  @classmethod
  def from_features(cls, features: np.ndarray) -> FeatureStats:
    """Statistics of one batch (B, d)."""
    x = np.asarray(features, np.float64).reshape(-1, np.shape(features)[-1])
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    centred = x - mean
    return cls(len(x), mean, centred.T @ centred)

  def merge(self, other: FeatureStats) -> FeatureStats:
    """Statistics of both sets of vectors (Chan et al.'s pairwise combination; exact)."""
    n = self.n + other.n
    if n == 0:
      return self
    delta = other.mean - self.mean
    mean = self.mean + delta * (other.n / n)
    m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
    return FeatureStats(n, mean, m2)

  def update(self, features: np.ndarray) -> FeatureStats:
    """Adds a batch of vectors (B, d)."""
    return self.merge(FeatureStats.from_features(features))

  @property
  def mu(self) -> np.ndarray:
    return self.mean

  @property
  def sigma(self) -> np.ndarray:
    """Unbiased covariance (``np.cov`` of the vectors), shape (d, d); needs n >= 2."""
    if self.n < 2:
      raise ValueError(f"A covariance needs at least 2 feature vectors, got {self.n}.")
    return self.m2 / (self.n - 1)


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Statistics of a dataset's pool3 features: mu (d,), sigma (d, d), and the features (N, d) or None."""
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray | None = None


def save_reference_stats(path: str, mu: np.ndarray, sigma: np.ndarray,
                         features: np.ndarray | None = None) -> None:
  """Writes ``mu``, ``sigma`` (and ``features`` for KID) to ``path`` (.npz) atomically."""
  arrays: dict[str, Any] = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
  if features is not None:
    arrays["features"] = np.asarray(features, np.float32)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load_reference_stats(path: str) -> ReferenceStats:
  """Reads statistics saved by ``save_reference_stats`` (or the original's ``pool_3`` files).

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file holds neither ``mu``/``sigma`` nor features.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No reference statistics at {path!r}; compute them with --mode fid_stats.")
  with np.load(path) as data:
    files = set(data.files)
    features = data["features"] if "features" in files else data["pool_3"] if "pool_3" in files else None
    if {"mu", "sigma"} <= files:
      return ReferenceStats(data["mu"], data["sigma"], features)
  if features is None:
    raise ValueError(f"{path!r} has neither 'mu' and 'sigma' nor features; its keys: {sorted(files)}.")
  stats = FeatureStats.from_features(features)
  return ReferenceStats(stats.mu, stats.sigma, features)


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
  """The energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistics) of samples x (n, d) and y (m, d)."""
  x, y = np.asarray(x, np.float64).reshape(len(x), -1), np.asarray(y, np.float64).reshape(len(y), -1)

  def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    d2 = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return float(np.mean(np.sqrt(np.maximum(d2, 0.0))))

  return 2.0 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)


def compute_metrics(features: np.ndarray, logits: np.ndarray | None, reference: ReferenceStats,
                    stats: FeatureStats | None = None, num_splits: int = 1, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
  """FID, and KID and IS where their inputs exist, of generated samples against a reference.

  Args:
    features: pool3 features of the samples (N, d).
    logits: their Inception logits (N, classes), or None to skip the Inception score.
    reference: the dataset's statistics; KID needs its ``features``.
    stats: the samples' statistics if already accumulated (else computed from ``features``).
    num_splits: Inception score splits.
    kid_subsets, kid_subset_size, seed: KID subsets.

  Returns:
    ``{"fid": ...}`` plus ``"kid"``, ``"kid_std"`` and ``"is"``, ``"is_std"`` where computable.
  """
  features = np.asarray(features)
  if stats is None and features.shape[0] < features.shape[1]:  # fewer samples than dimensions: exact fast path
    results = {"fid": frechet_distance_of_features(features, reference.mu, reference.sigma)}
  else:
    stats = FeatureStats.from_features(features) if stats is None else stats
    results = {"fid": frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)}
  if reference.features is not None:
    results["kid"], results["kid_std"] = kernel_inception_distance(
        features, reference.features, kid_subsets, kid_subset_size, seed)
  if logits is not None:
    results["is"], results["is_std"] = inception_score(logits, num_splits)
  return results
