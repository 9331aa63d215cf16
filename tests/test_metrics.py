"""The FID Inception network and the sample-quality metrics.

The network is checked with a synthetic weight file written from its own name -> shape table (the
real weights cannot be downloaded here): shapes, strict loading, the torch -> flax layout of its
layers against brute-force convolutions in torch's conventions, its pooling and its resize against
direct numpy formulas, and torchvision's published parameter count. The metrics are checked against
independent computations in float64: FID against scipy's ``sqrtm`` and the closed form for
commuting covariances, KID against a double loop over the kernel, and IS against a per-sample
KL formula and its known values.
"""

import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from score_sde import metrics
from score_sde.models import inception


def _synthetic_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights with pytorch-fid's names and shapes, scaled so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for name, shape in inception.torch_shapes().items():
    if name.endswith("conv.weight"):
      value = rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[1:])), shape)
    elif name.endswith(("bn.weight", "running_var")):
      value = rng.uniform(0.5, 1.5, shape)
    elif name == "fc.weight":
      value = rng.normal(0.0, 1.0 / math.sqrt(shape[1]), shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    state_dict[name] = value.astype(np.float32)
  return state_dict


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(state_dict, path of it as .npz, variables loaded back from that file)."""
  state_dict = _synthetic_state_dict()
  path = tmp_path_factory.mktemp("inception") / "weights.npz"
  np.savez(path, **state_dict)
  return state_dict, str(path), inception.load_variables(str(path))


# ----------------------------------------------------------------------------- network


def test_names_and_parameter_count_are_pytorch_fid_s():
  shapes = inception.torch_shapes()
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert shapes["Mixed_6e.branch7x7dbl_2.conv.weight"] == (192, 192, 7, 1)
  assert shapes["Mixed_7a.branch7x7x3_4.conv.weight"] == (192, 192, 3, 3)
  assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
  assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
  assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
  assert not [k for k in shapes if "Aux" in k]
  # torchvision's Inception-v3 has 27,161,264 parameters; less its auxiliary classifier
  # (3,326,696) plus 8 more classes of 2049 weights.
  trainable = sum(math.prod(s) for k, s in shapes.items() if "running" not in k)
  assert trainable == 27_161_264 - 3_326_696 + 8 * 2049


@pytest.fixture(scope="module")
def forward(weights):
  """Two 32x32 images (uint8) and the network's (pool3, logits) of them."""
  images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  pool3, logits = inception.inception_fn(weights[2])(images)
  return images, pool3, logits


@pytest.mark.slow
def test_forward_shapes_and_logits_layer(weights, forward):
  state_dict = weights[0]
  _, pool3, logits = forward
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  assert pool3.dtype == logits.dtype == jnp.float32
  pool3, logits = np.asarray(pool3, np.float64), np.asarray(logits, np.float64)
  assert np.all(np.isfinite(logits)) and np.all(pool3 >= 0) and pool3.std() > 0
  assert not np.allclose(pool3[0], pool3[1])
  expected = pool3 @ state_dict["fc.weight"].T.astype(np.float64) + state_dict["fc.bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _torch_reference(images, state_dict):
  """The FID Inception in PyTorch's functional ops, NCHW, straight from the state_dict."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  sd = {k: torch.from_numpy(v) for k, v in state_dict.items()}

  def conv(x, name, stride=1, padding=None):   # padding None: "same" (stride-1 block convs)
    w = sd[name + ".conv.weight"]
    padding = (w.shape[2] // 2, w.shape[3] // 2) if padding is None else padding
    x = F.conv2d(x, w, stride=stride, padding=padding)
    x = F.batch_norm(x, sd[name + ".bn.running_mean"], sd[name + ".bn.running_var"],
                     sd[name + ".bn.weight"], sd[name + ".bn.bias"], training=False, eps=1e-3)
    return F.relu(x)

  def chain(x, prefix, names, last_stride=1):
    for i, name in enumerate(names):
      last = i == len(names) - 1
      x = conv(x, f"{prefix}.{name}", *((2, 0) if last and last_stride == 2 else ()))
    return x

  def avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x = 2.0 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1.0
  x = conv(x, "Conv2d_1a_3x3", 2, 0)
  x = conv(conv(x, "Conv2d_2a_3x3", 1, 0), "Conv2d_2b_3x3", 1, 1)
  x = conv(F.max_pool2d(x, 3, 2), "Conv2d_3b_1x1", 1, 0)
  x = F.max_pool2d(conv(x, "Conv2d_4a_3x3", 1, 0), 3, 2)
  for p in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = torch.cat([conv(x, p + ".branch1x1"), chain(x, p, ["branch5x5_1", "branch5x5_2"]),
                   chain(x, p, [f"branch3x3dbl_{i}" for i in (1, 2, 3)]),
                   conv(avg(x), p + ".branch_pool")], 1)
  x = torch.cat([conv(x, "Mixed_6a.branch3x3", 2, 0),
                 chain(x, "Mixed_6a", [f"branch3x3dbl_{i}" for i in (1, 2, 3)], last_stride=2),
                 F.max_pool2d(x, 3, 2)], 1)
  for p in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = torch.cat([conv(x, p + ".branch1x1"), chain(x, p, [f"branch7x7_{i}" for i in (1, 2, 3)]),
                   chain(x, p, [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
                   conv(avg(x), p + ".branch_pool")], 1)
  x = torch.cat([chain(x, "Mixed_7a", ["branch3x3_1", "branch3x3_2"], last_stride=2),
                 chain(x, "Mixed_7a", [f"branch7x7x3_{i}" for i in (1, 2, 3, 4)], last_stride=2),
                 F.max_pool2d(x, 3, 2)], 1)
  for p, pool in (("Mixed_7b", avg), ("Mixed_7c", lambda t: F.max_pool2d(t, 3, 1, 1))):
    b3, bd = conv(x, p + ".branch3x3_1"), chain(x, p, ["branch3x3dbl_1", "branch3x3dbl_2"])
    x = torch.cat([conv(x, p + ".branch1x1"),
                   conv(b3, p + ".branch3x3_2a"), conv(b3, p + ".branch3x3_2b"),
                   conv(bd, p + ".branch3x3dbl_3a"), conv(bd, p + ".branch3x3dbl_3b"),
                   conv(pool(x), p + ".branch_pool")], 1)
  pool3 = x.mean(dim=(2, 3))
  return pool3.numpy(), F.linear(pool3, sd["fc.weight"], sd["fc.bias"]).numpy()


@pytest.mark.slow  # the Inception network in JAX and in PyTorch
def test_network_matches_a_pytorch_functional_reference(weights, forward):
  pytest.importorskip("torch", reason="the PyTorch reference needs torch (optional)")
  images, pool3, logits = forward
  ref_pool3, ref_logits = _torch_reference(images, weights[0])
  np.testing.assert_allclose(pool3, ref_pool3, rtol=1e-3, atol=1e-4 * np.abs(ref_pool3).max())
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-3, atol=1e-4 * np.abs(ref_logits).max())


def test_pth_files_load_like_npz(weights, tmp_path):
  torch = pytest.importorskip("torch", reason="reading .pth files needs torch (optional)")
  state_dict, _, variables = weights
  pth = tmp_path / "weights.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pth)
  jax.tree.map(np.testing.assert_array_equal, inception.load_variables(str(pth)), variables)
  inception.pth_to_npz(str(pth), str(tmp_path / "converted.npz"))
  jax.tree.map(np.testing.assert_array_equal,
               inception.load_variables(str(tmp_path / "converted.npz")), variables)


def _torch_conv_bn_relu(x, state_dict, prefix, stride, padding):
  """BasicConv2d in torch's conventions, by brute force: x (H, W, I), OIHW kernel -> (H', W', O)."""
  w = state_dict[prefix + ".conv.weight"].astype(np.float64)
  _, _, kh, kw = w.shape
  ph, pw = padding
  xp = np.pad(x.astype(np.float64), ((ph, ph), (pw, pw), (0, 0)))
  ho, wo = (xp.shape[0] - kh) // stride + 1, (xp.shape[1] - kw) // stride + 1
  out = np.zeros((ho, wo, w.shape[0]))
  for i in range(ho):
    for j in range(wo):
      patch = xp[i * stride:i * stride + kh, j * stride:j * stride + kw]       # (kh, kw, I)
      out[i, j] = np.einsum("oikl,kli->o", w, patch)
  bn = {k: state_dict[f"{prefix}.bn.{k}"].astype(np.float64)
        for k in ("weight", "bias", "running_mean", "running_var")}
  out = (out - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"] + bn["bias"]
  return np.maximum(out, 0.0)


@pytest.mark.parametrize("prefix, features, kernel, stride, padding, in_shape", [
    ("Conv2d_1a_3x3", 32, (3, 3), 2, (0, 0), (9, 8, 3)),
    ("Mixed_6b.branch7x7_2", 128, (1, 7), 1, (0, 3), (4, 6, 128)),
    ("Mixed_7b.branch3x3_2b", 384, (3, 1), 1, (1, 0), (3, 2, 384)),
])
def test_loaded_layers_match_torch_conventions(weights, prefix, features, kernel, stride, padding,
                                                in_shape):
  state_dict, _, variables = weights
  x = np.random.default_rng(2).normal(size=in_shape).astype(np.float32)
  path = prefix.split(".")
  layer_vars = {c: _subtree(variables[c], path) for c in ("params", "batch_stats")}
  layer = inception.BasicConv2d(features, kernel, stride=stride, padding=padding)
  got = np.asarray(layer.apply(layer_vars, x[None]))[0]
  np.testing.assert_allclose(got, _torch_conv_bn_relu(x, state_dict, prefix, stride, padding),
                             rtol=1e-4, atol=1e-4)


def _subtree(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_average_pool_counts_only_pixels_inside_and_max_pool_pads_with_minus_infinity():
  x = np.random.default_rng(3).normal(size=(1, 5, 4, 2))
  avg = np.asarray(inception._avg_pool_3x3(jnp.asarray(x)))[0]
  mx = np.asarray(inception._max_pool_3x3(jnp.asarray(x), 1, 1))[0]
  for i in range(5):
    for j in range(4):
      window = x[0, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
      np.testing.assert_allclose(avg[i, j], window.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(mx[i, j], window.max(axis=(0, 1)), rtol=1e-6)


def _torch_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """F.interpolate(mode="bilinear", align_corners=False) of (B, H, W, C) to (B, size, size, C)."""
  for axis in (1, 2):
    n = x.shape[axis]
    src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = (src - i0).reshape([-1 if a == axis else 1 for a in range(4)])
    x = (1 - lam) * np.take(x, i0, axis=axis) + lam * np.take(x, i1, axis=axis)
  return x


@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (1, 401, 333, 3), (1, 299, 299, 3), (2, 9, 9, 1)])
def test_preprocess_is_half_pixel_bilinear_to_299_in_minus_one_one(shape):
  images = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
  images.reshape(-1)[:2] = (0, 255)
  got = np.asarray(inception.preprocess(images))
  rgb = np.repeat(images, 3, axis=-1) if shape[-1] == 1 else images
  expected = 2.0 * _torch_bilinear(rgb.astype(np.float64) / 255.0, 299) - 1.0
  assert got.shape == (shape[0], 299, 299, 3)
  # Sample positions are float32 in both implementations: ~1e-7 of the input size per pixel.
  np.testing.assert_allclose(got, expected, atol=2e-6 + 2e-7 * max(shape[1:3]))
  assert got.min() >= -1.0 and got.max() <= 1.0
  with pytest.raises(ValueError, match="1 or 3 channels"):
    inception.preprocess(np.zeros((1, 8, 8, 2)))


def test_loading_is_strict_and_lists_offending_keys(weights, tmp_path):
  state_dict, _, _ = weights
  bad = dict(state_dict)
  bad["Mixed_5b.branch9x9.conv.weight"] = np.zeros((1,), np.float32)
  del bad["Mixed_6c.branch7x7dbl_4.bn.running_mean"]
  bad["fc.bias"] = np.zeros((1000,), np.float32)
  bad["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)  # ignored, as torch does
  path = tmp_path / "bad.npz"
  np.savez(path, **bad)
  with pytest.raises(ValueError) as error:
    inception.load_variables(str(path))
  message = str(error.value)
  assert "unknown keys: Mixed_5b.branch9x9.conv.weight" in message
  assert "missing keys: Mixed_6c.branch7x7dbl_4.bn.running_mean" in message
  assert re.search(r"misshapen arrays: fc\.bias \(1000,\) \(expected \(1008,\)\)", message)
  assert "num_batches_tracked" not in message


def test_missing_weight_file_says_where_to_get_it(tmp_path):
  for path in (str(tmp_path / "nowhere.npz"), ""):
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth"):
      inception.load_variables(path)


def test_pth_without_torch_asks_for_npz(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)   # "import torch" now fails, as without torch
  path = tmp_path / "weights.pth"
  path.write_bytes(b"not read")
  with pytest.raises(ImportError, match="convert it to .npz"):
    inception.load_variables(str(path))


# ----------------------------------------------------------------------------- Frechet distance


def _gaussian_features(rng, n, mu, cov):
  return rng.multivariate_normal(mu, cov, size=n)


def test_frechet_distance_matches_scipy_sqrtm_on_features():
  rng = np.random.default_rng(5)
  d = 16
  a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  x = _gaussian_features(rng, 3000, rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d))
  y = _gaussian_features(rng, 2000, rng.normal(size=d), b @ b.T / d)
  mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), direct, rtol=1e-9)
  assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("rank", [12, 5])
def test_frechet_distance_closed_form_for_commuting_covariances(rank):
  # S1 = Q diag(l1) Q^T and S2 = Q diag(l2) Q^T commute: d^2 = |mu1 - mu2|^2 + |sqrt l1 - sqrt l2|^2,
  # also when S1 is singular (fewer features than dimensions).
  rng = np.random.default_rng(6)
  d = 12
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  l1 = np.concatenate([rng.uniform(0.1, 4.0, rank), np.zeros(d - rank)])
  l2 = rng.uniform(0.1, 4.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8)
  with pytest.raises(ValueError, match="Mismatched"):
    metrics.frechet_distance(mu1, s1, mu2[:-1], s2)


# ----------------------------------------------------------------------------- KID


def _mmd2_double_loop(x, y):
  m, d = x.shape
  k = lambda u, v: (sum(ui * vi for ui, vi in zip(u, v)) / d + 1.0) ** 3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return (xx + yy) / (m * (m - 1)) - 2.0 * xy / m**2


def test_kid_estimator_matches_double_loop():
  rng = np.random.default_rng(7)
  x, y = rng.normal(size=(9, 4)), rng.normal(0.5, 1.2, size=(9, 4))
  np.testing.assert_allclose(metrics.mmd2_unbiased(x, y), _mmd2_double_loop(x, y), rtol=1e-12)
  # One subset holding every feature is the plain estimator (it does not depend on the order).
  mean, std = metrics.kernel_inception_distance(x, y, num_subsets=1, subset_size=100)
  np.testing.assert_allclose(mean, _mmd2_double_loop(x, y), rtol=1e-12)
  assert std == 0.0


def test_kid_subsets_are_seeded_and_detect_a_shift():
  rng = np.random.default_rng(8)
  same1, same2 = rng.normal(size=(400, 8)), rng.normal(size=(300, 8))
  shifted = rng.normal(0.3, 1.0, size=(300, 8))
  kid = lambda a, b, seed=0: metrics.kernel_inception_distance(a, b, 50, 100, seed)
  assert kid(same1, same2) == kid(same1, same2) != kid(same1, same2, seed=1)
  assert kid(same1, shifted)[0] > 10 * abs(kid(same1, same2)[0])


def test_mmd2_estimate_is_unbiased():
  # Over many independent pairs of small samples from one law, the estimates average to 0 within
  # their standard error; keeping the i = j terms (the biased estimate) would not.
  rng = np.random.default_rng(13)
  x, y = rng.normal(size=(2, 2000, 6, 3))
  estimates = np.array([metrics.mmd2_unbiased(a, b) for a, b in zip(x, y)])
  assert abs(estimates.mean()) < 3 * estimates.std() / math.sqrt(len(estimates))
  k = metrics.polynomial_kernel
  biased = np.array([(k(a, a).sum() + k(b, b).sum() - 2 * k(a, b).sum()) / len(a)**2
                     for a, b in zip(x, y)])
  assert biased.mean() > 10 * estimates.std() / math.sqrt(len(estimates))


# ----------------------------------------------------------------------------- Inception score


def test_inception_score_matches_per_sample_formula():
  rng = np.random.default_rng(9)
  logits = rng.normal(0, 3, size=(30, 7))
  scores = []
  for part in np.split(logits, 3):
    p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
    marginal = p.mean(0)
    scores.append(math.exp(np.mean([np.sum(row * np.log(row / marginal)) for row in p])))
  mean, std = metrics.inception_score(logits, num_splits=3)
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)


def test_inception_score_known_values():
  assert metrics.inception_score(np.zeros((20, 1008))) == pytest.approx((1.0, 0.0), abs=1e-12)
  k = 5
  one_hot = np.full((40, 1008), -1e4)
  one_hot[np.arange(40), np.arange(40) % k] = 0.0
  mean, std = metrics.inception_score(one_hot, num_splits=4)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- statistics


def test_streaming_statistics_use_every_example_exactly():
  rng = np.random.default_rng(10)
  x = rng.normal(1e4, 1.0, size=(101, 6)) @ rng.normal(size=(6, 6))   # large mean, unit-scale spread
  stats = metrics.FeatureStats.empty(6)
  for batch in np.split(x, [1, 1, 33, 64, 99]):                      # sizes 1, 0, 32, 31, 35, 2
    stats = stats.update(batch)
  assert stats.n == 101
  np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-8)
  halves = metrics.FeatureStats.from_features(x[50:]).merge(metrics.FeatureStats.from_features(x[:50]))
  np.testing.assert_allclose(halves.sigma, stats.sigma, rtol=1e-8, atol=1e-8)
  with pytest.raises(ValueError, match="at least 2"):
    _ = metrics.FeatureStats.from_features(x[:1]).sigma


def test_reference_statistics_round_trip(tmp_path):
  rng = np.random.default_rng(11)
  features = rng.normal(size=(50, 4)).astype(np.float32)
  stats = metrics.FeatureStats.from_features(features)
  path = str(tmp_path / "ref.npz")
  metrics.save_reference_stats(path, stats.mu, stats.sigma, features)
  ref = metrics.load_reference_stats(path)
  np.testing.assert_array_equal(ref.mu, stats.mu)
  np.testing.assert_array_equal(ref.sigma, stats.sigma)
  np.testing.assert_array_equal(ref.features, features)
  metrics.save_reference_stats(path, stats.mu, stats.sigma)
  assert metrics.load_reference_stats(path).features is None
  np.savez(tmp_path / "original.npz", pool_3=features)                 # the original's format
  ref = metrics.load_reference_stats(str(tmp_path / "original.npz"))
  np.testing.assert_allclose(ref.sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10)
  np.savez(tmp_path / "empty.npz", other=features)
  with pytest.raises(ValueError, match="neither"):
    metrics.load_reference_stats(str(tmp_path / "empty.npz"))
  with pytest.raises(FileNotFoundError):
    metrics.load_reference_stats(str(tmp_path / "absent.npz"))


def test_compute_metrics_against_a_reference():
  rng = np.random.default_rng(12)
  real, fake = rng.normal(size=(200, 5)), rng.normal(0.5, 1.0, size=(150, 5))
  logits = rng.normal(size=(150, 10))
  ref_stats = metrics.FeatureStats.from_features(real)
  ref = metrics.ReferenceStats(ref_stats.mu, ref_stats.sigma, real)
  results = metrics.compute_metrics(fake, logits, ref, kid_subsets=10, kid_subset_size=100)
  fake_stats = metrics.FeatureStats.from_features(fake)
  assert results["fid"] == pytest.approx(
      metrics.frechet_distance(fake_stats.mu, fake_stats.sigma, ref.mu, ref.sigma))
  assert (results["kid"], results["kid_std"]) == metrics.kernel_inception_distance(fake, real, 10, 100)
  assert (results["is"], results["is_std"]) == metrics.inception_score(logits)
  no_kid = metrics.compute_metrics(fake, None, metrics.ReferenceStats(ref.mu, ref.sigma))
  assert set(no_kid) == {"fid"}


def test_frechet_distance_of_few_features_equals_the_full_computation():
  rng = np.random.default_rng(3)
  d = 40
  a = rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) * 0.3 + 1.0
  b = rng.normal(size=(12, d)) * 2.0                       # n < d: a rank-11 covariance
  ref = metrics.FeatureStats.from_features(a)
  fast = metrics.frechet_distance_of_features(b, ref.mu, ref.sigma)
  full = metrics.frechet_distance(b.mean(0), np.cov(b, rowvar=False), ref.mu, ref.sigma)
  # The full path clips the rank-deficient product's rounding-level negative eigenvalues before sqrt:
  # errors of sqrt(1e-16 scale), about 1e-8 relative.
  assert fast == pytest.approx(full, rel=1e-6)
  assert metrics.compute_metrics(b, None, metrics.ReferenceStats(ref.mu, ref.sigma))["fid"] == pytest.approx(full)
