"""Data sets and the grain pipeline: exact densities, determinism, sharding, coverage, resuming."""

import dataclasses
import importlib.abc
import json
import sys

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from sklearn.datasets import load_digits

from configs import default
from experiments import bench_input
from score_sde import datasets
from tests import stats


def _ids(n):
  """A source whose example i is the point (i,) with label i, so batches show which examples they hold."""
  return datasets.ArraySource(np.arange(n, dtype=np.float32)[:, None], np.arange(n, dtype=np.int32))


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def _config(dataset, **data):
  config = default.get_default_configs()
  config.data.dataset = dataset
  config.data.update(data)
  return config


def _mock_cifar(n):
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


class _TensorFlowImportSpy(importlib.abc.MetaPathFinder):
  """Records every attempt to import tensorflow, whether or not it is installed."""

  def __init__(self):
    self.attempts = []

  def find_spec(self, fullname, path, target=None):
    if fullname.split(".")[0] == "tensorflow":
      self.attempts.append(fullname)
    return None


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A CIFAR-shaped TFDS set written as real ArrayRecord files without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # no checksums file to look up (its look-up needs the importlib_resources backport)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3)), "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 20), "test": self._generate_examples(1, 6)}

  def _generate_examples(self, seed, n):
    rng = np.random.default_rng(seed)
    for i in range(n):
      image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      yield i, {"image": PIL.Image.fromarray(image), "label": i % 10}


# --- Toy sets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(datasets.TOY_DATASETS))
def test_toy_sets_are_deterministic_unit_scale_points(name):
  x, labels = datasets.sample_toy(name, 2000, seed=0)
  assert x.shape == (2000, 2) and x.dtype == np.float32
  assert labels.shape == (2000,) and labels.dtype == np.int32
  np.testing.assert_array_equal(x, datasets.sample_toy(name, 2000, seed=0)[0])
  assert not np.allclose(x, datasets.sample_toy(name, 2000, seed=1)[0])
  assert np.all((x.std(0) > 0.4) & (x.std(0) < 1.5)) and np.all(np.abs(x.mean(0)) < 0.5)


def test_toy_splits_are_fixed_disjoint_and_sized():
  train = datasets.toy_source("twomoons", "train", num_train=500)
  test = datasets.toy_source("twomoons", "test")
  assert len(train) == 500 and len(test) == 10_000
  assert len(datasets.toy_source("twomoons", "train")) == 100_000  # the default
  np.testing.assert_array_equal(train.images, datasets.toy_source("twomoons", "train", num_train=500).images)
  assert not set(map(tuple, train.images)) & set(map(tuple, test.images))


@pytest.mark.parametrize("name", ["mixture", "8gaussians"])
def test_exact_density_is_the_one_the_points_are_drawn_from(name):
  density = datasets.toy_density(name)
  n = 1000
  drawn = datasets.sample_toy(name, n, seed=3)[0]
  exact = np.asarray(density.sample(jax.random.key(0), n))
  # Two-sample energy distance within the 99% quantile of exact-vs-exact draws.
  threshold = stats.null_threshold(lambda key, m: density.sample(key, m), n, reps=20)
  assert float(stats.energy_distance(drawn, exact)) < threshold
  # Mean log-density of the drawn points agrees with that of exact draws (a cross-entropy check).
  gap, se = stats.mean_logp_gap(density.log_prob, drawn, exact)
  assert abs(gap) < 4 * se


# --- Embedded digits --------------------------------------------------------------------------

def test_digits_split_range_and_pipeline():
  train, test = datasets.digits_source("train"), datasets.digits_source("test")
  assert len(train) == 1500 and len(test) == 297
  assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
  assert train.images.max() == 255 and train.images.min() == 0
  assert len(np.unique(train.images)) == 17 and set(np.unique(train.labels)) == set(range(10))
  # The split partitions scikit-learn's 1797 digits (values 0..16 scaled to 0..255).
  digits = load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)
  full = sorted(image.tobytes() + bytes([c]) for image, c in zip(images, digits.target))
  parts = sorted(image.tobytes() + bytes([c])
                 for split in (train, test) for image, c in zip(split.images, split.labels))
  assert parts == full
  train_ds, eval_ds = datasets.get_dataset(_config("digits", num_channels=1, image_size=16), evaluation=True)
  batch = next(eval_ds.make_iterator())
  assert batch["image"].shape == (512, 16, 16, 1) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and eval_ds.eight_bit
  assert eval_ds.num_batches == 1 and batch["mask"].sum() == 297 and train_ds.num_batches == 3


# --- TFDS images ------------------------------------------------------------------------------

def test_cifar10_through_mock_data_resize_flip_dequantise_and_scale():
  config = _config("CIFAR10", image_size=16)
  config.training.batch_size = 8
  config.training.n_jitted_steps = 2
  with _mock_cifar(40):
    source = tfds.data_source("cifar10", split="train")
    # Evaluation order is the source order: check the resize against PIL on whole RGB images.
    _, eval_ds = datasets.get_dataset(config, evaluation=True)
    batch = next(eval_ds.make_iterator())
    assert batch["mask"].sum() == 40 and not batch["mask"][40:].any()
    expected = [PIL.Image.fromarray(source[i]["image"]).resize((16, 16), PIL.Image.Resampling.BILINEAR)
                for i in range(40)]
    np.testing.assert_array_equal(np.round(batch["image"][:40] * 255).astype(np.uint8),
                                  np.stack([np.asarray(image) for image in expected]))
    # Training streams that differ only in flip / dequantisation see the same examples in the same order.
    streams = {}
    for flip, dequantize in [(False, False), (True, False), (True, True)]:
      config.data.random_flip = flip
      train_ds, _ = datasets.get_dataset(config, uniform_dequantization=dequantize)
      streams[flip, dequantize] = np.stack([b["image"] for b in _take(train_ds.make_iterator(), 3)])
  plain, flipped, dequantized = streams[False, False], streams[True, False], streams[True, True]
  assert plain.shape == (3, 2, 8, 16, 16, 3) and train_ds.n_jitted_steps == 2
  plain, flipped, dequantized = (a.reshape(-1, 16, 16, 3) for a in (plain, flipped, dequantized))
  same = np.all(flipped == plain, axis=(1, 2, 3))
  mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and same.any() and mirrored.any()
  # Dequantised x = (k + u) / 256 with k the 8-bit value and u ~ U[0, 1).
  u = dequantized * 256 - np.round(flipped * 255)
  assert -1e-3 <= u.min() and u.max() <= 1 + 1e-3 and abs(u.mean() - 0.5) < 0.02
  # Scaling to [-1, 1] and back, under jit.
  scaler, inverse = datasets.get_data_scaler(True), datasets.get_data_inverse_scaler(True)
  np.testing.assert_allclose(jax.jit(scaler)(np.array([0.0, 0.25, 1.0])), [-1.0, -0.5, 1.0])
  np.testing.assert_allclose(jax.jit(inverse)(jax.jit(scaler)(plain)), plain, atol=1e-6)
  np.testing.assert_array_equal(datasets.get_data_scaler(False)(plain), plain)
  np.testing.assert_array_equal(datasets.get_data_inverse_scaler(False)(plain), plain)


def test_no_tensorflow_while_reading_a_real_array_record_set(tmp_path):
  TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  spy = _TensorFlowImportSpy()
  sys.meta_path.insert(0, spy)
  try:
    sources = {s: datasets.tfds_source("tiny_images", s, str(tmp_path)) for s in ("train", "test")}
    pipelines = {s: datasets.build_pipeline(src, name=s, batch_size=4, training=False, seed=0, image_size=8,
                                            random_flip=True, uniform_dequantization=True, process_count=1,
                                            process_index=0) for s, src in sources.items()}
    batches = {s: list(p.make_iterator()) for s, p in pipelines.items()}
  finally:
    sys.meta_path.remove(spy)
  assert not spy.attempts and "tensorflow" not in sys.modules
  assert [len(batches["train"]), len(batches["test"])] == [5, 2]
  assert batches["train"][0]["image"].shape == (4, 8, 8, 3)
  assert sum(b["mask"].sum() for b in batches["test"]) == 6
  train_images = {example["image"].tobytes() for example in sources["train"]}
  assert not train_images & {example["image"].tobytes() for example in sources["test"]}


def test_missing_tfds_set_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build cifar10") as info:
    datasets.get_dataset(_config("cifar10", data_dir=str(tmp_path)))
  assert f"--data_dir={tmp_path}" in str(info.value) and "array_record" in str(info.value)


# --- Pipeline behaviour -----------------------------------------------------------------------

def test_shuffling_is_seeded_and_each_epoch_a_permutation():
  def labels(seed, k=6):
    pipeline = datasets.build_pipeline(_ids(24), name="ids", batch_size=8, training=True, seed=seed,
                                       process_index=0, process_count=1)
    return np.stack([b["label"] for b in _take(pipeline.make_iterator(), k)])

  first = labels(0)
  np.testing.assert_array_equal(first, labels(0))
  assert not np.array_equal(first, labels(1))
  epochs = first.reshape(2, 24)
  assert all(sorted(e) == list(range(24)) for e in epochs) and not np.array_equal(*epochs)
  assert not np.array_equal(epochs[0], np.arange(24))


@pytest.mark.parametrize("n_jitted_steps", [1, 2])
def test_evaluation_covers_every_example_once_on_every_host(n_jitted_steps):
  seen, shapes, counts = [], set(), set()
  for host in range(2):
    pipeline = datasets.build_pipeline(_ids(37), name="ids", batch_size=8, training=False, seed=0,
                                       n_jitted_steps=n_jitted_steps, process_index=host, process_count=2)
    batches = list(pipeline.make_iterator())
    counts.add((len(batches), pipeline.num_batches))
    shapes |= {b["image"].shape for b in batches}
    seen += [int(label) for b in batches for label in b["label"][b["mask"]]]
  assert sorted(seen) == list(range(37))
  assert len(counts) == 1 and len(shapes) == 1
  assert shapes.pop()[:-2] == ((n_jitted_steps,) if n_jitted_steps > 1 else ())


def test_two_hosts_read_disjoint_shards_that_make_the_single_host_batches():
  def stream(host, count, k=9):
    pipeline = datasets.build_pipeline(_ids(30), name="ids", batch_size=6, training=True, seed=5,
                                       process_index=host, process_count=count)
    return [set(b["label"].tolist()) for b in _take(pipeline.make_iterator(), k)]

  single, host0, host1 = stream(0, 1), stream(0, 2), stream(1, 2)
  assert all(not a & b and a | b == s for a, b, s in zip(host0, host1, single))
  assert set().union(*host0[:5], *host1[:5]) == set(range(30))  # the first epoch


def test_resuming_from_a_saved_state_continues_the_same_batches():
  def pipeline(batch_size=4, n_jitted_steps=1, host=0, count=1):
    return datasets.build_pipeline(_ids(10), name="ids", batch_size=batch_size, training=True, seed=2,
                                   n_jitted_steps=n_jitted_steps, process_index=host, process_count=count)

  uninterrupted = [b["label"] for b in _take(pipeline().make_iterator(), 8)]
  first = pipeline()
  iterator = first.make_iterator()
  _take(iterator, 4)
  state = json.loads(json.dumps(first.iterator_state(iterator)))
  resumed = [b["label"] for b in _take(pipeline().make_iterator(state), 4)]
  np.testing.assert_array_equal(np.stack(resumed), np.stack(uninterrupted[4:]))
  # The same position restores on two hosts, and with two batches per jitted call.
  halves = [next(pipeline(host=h, count=2).make_iterator(state))["label"] for h in range(2)]
  assert sorted(np.concatenate(halves).tolist()) == sorted(uninterrupted[4].tolist())
  np.testing.assert_array_equal(next(pipeline(n_jitted_steps=2).make_iterator(state))["label"],
                                np.stack(uninterrupted[4:6]))
  with pytest.raises(ValueError, match="multiple of"):
    pipeline(batch_size=6).make_iterator(state)
  with pytest.raises(ValueError, match="same data set, seed and split"):
    datasets.build_pipeline(_ids(10), name="ids", batch_size=4, training=True, seed=3, process_index=0,
                            process_count=1).make_iterator(state)


@pytest.mark.slow  # spawns grain worker processes
def test_worker_processes_give_the_same_batches_and_resume_exactly():
  config = _config("digits", image_size=8, num_channels=1, random_flip=True, uniform_dequantization=True)
  config.training.batch_size, config.eval.batch_size = 32, 128

  def streams(workers):
    config.data.num_workers = workers
    return datasets.get_dataset(config, process_index=0, process_count=1)

  (train_ds, _), (train_mp, held_out_mp) = streams(0), streams(2)
  assert (train_mp.num_workers, held_out_mp.num_workers) == (2, 0)  # the held-out stream gives one batch per eval
  reference = [b["image"] for b in _take(train_ds.make_iterator(), 6)]
  iterator = train_mp.make_iterator()
  first = [b["image"] for b in _take(iterator, 3)]
  state = json.loads(json.dumps(train_mp.iterator_state(iterator)))
  iterator.close()
  resumed = train_mp.make_iterator(state)  # new workers start at element 3
  rest = [b["image"] for b in _take(resumed, 3)]
  resumed.close()
  assert state["position"] == 3 * 32
  np.testing.assert_array_equal(np.stack(first + rest), np.stack(reference))
  del reference, first, rest


@pytest.mark.slow  # starts two more worker processes (about 5 s)
def test_an_evaluation_pass_over_worker_processes_gives_every_element_once_in_order():
  config = _config("digits", image_size=8, num_channels=1, random_flip=False, num_workers=2)
  config.eval.batch_size = 128
  held_out = datasets.get_dataset(config, evaluation=True, process_index=0, process_count=1)[1]
  passes = [np.concatenate([b["label"][b["mask"]] for b in ds.make_iterator()])
            for ds in (held_out, dataclasses.replace(held_out, num_workers=0))]
  assert held_out.num_workers == 2 and held_out.num_batches == 3
  np.testing.assert_array_equal(passes[0], passes[1])


def test_configuration_errors_say_what_to_do():
  with pytest.raises(ValueError, match="not divisible by the number of processes.*multiple of 3"):
    datasets.build_pipeline(_ids(10), name="ids", batch_size=10, training=True, seed=0, process_index=0,
                            process_count=3)
  with pytest.raises(ValueError, match=r"config.training.batch_size=128 is not divisible"):
    datasets.get_dataset(_config("mixture", random_flip=False), process_count=3)
  with pytest.raises(ValueError, match="valid choices.*8gaussians.*cifar10.*digits"):
    datasets.get_dataset(_config("mnist"))
  with pytest.raises(ValueError, match="config.data.random_flip=False"):
    datasets.get_dataset(_config("swissroll"))
  with pytest.raises(ValueError, match="num_channels=1"):
    datasets.get_dataset(_config("digits"))
  with pytest.raises(ValueError, match="no closed-form density"):
    datasets.toy_density("swissroll")
  with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
    datasets.build_pipeline(_ids(10), name="ids", batch_size=2, training=True, seed=0, process_index=0,
                            process_count=1, num_workers=-1)


def test_toy_pipeline_from_config_carries_the_density():
  config = _config("8gaussians", random_flip=False, num_train=1000)
  config.training.batch_size = 16
  train_ds, eval_ds = datasets.get_dataset(config, process_index=0, process_count=1)
  batch = next(train_ds.make_iterator())
  assert batch["image"].shape == (16, 2) and batch["mask"].all() and train_ds.num_examples == 1000
  assert train_ds.density is not None and eval_ds.num_examples == 10_000 and not train_ds.eight_bit
  assert "tensorflow" not in sys.modules


def test_celeba_is_centre_cropped_to_140_then_resized():
  config = _config("CELEBA", image_size=16, random_flip=False)
  config.eval.batch_size = 8
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    source = tfds.data_source("celeb_a", split="validation")
    _, eval_ds = datasets.get_dataset(config, evaluation=True)
    batch = next(eval_ds.make_iterator())
  image = np.asarray(source[0]["image"])
  h, w = image.shape[:2]
  crop = image[(h - 140) // 2:(h - 140) // 2 + 140, (w - 140) // 2:(w - 140) // 2 + 140]
  expected = np.stack([np.asarray(PIL.Image.fromarray(crop[..., c]).resize((16, 16), PIL.Image.Resampling.BILINEAR))
                       for c in range(3)], -1)
  assert batch["image"].shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(np.round(batch["image"][0] * 255).astype(np.uint8), expected)


def _lsun_with_pil(image, size):
  """The original's LSUN rule written with PIL on whole RGB images: the expected output."""
  h, w = image.shape[:2]
  if size == 128:  # resize_small to 128 (bilinear), then the central 128 x 128
    ratio = 128 / min(h, w)
    small = np.asarray(PIL.Image.fromarray(image).resize((round(w * ratio), round(h * ratio)),
                                                         PIL.Image.Resampling.BILINEAR))
    top, left = (small.shape[0] - 128) // 2, (small.shape[1] - 128) // 2
    return small[top:top + 128, left:left + 128]
  crop = min(h, w)  # the central square, then bicubic
  square = image[(h - crop) // 2:(h - crop) // 2 + crop, (w - crop) // 2:(w - crop) // 2 + crop]
  return np.asarray(PIL.Image.fromarray(square).resize((size, size), PIL.Image.Resampling.BICUBIC))


def test_lsun_at_128_is_resize_small_then_central_crop():
  landscape = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
  # 150 x 200 -> shorter side 128: 128 x round(200 * 128 / 150) = 128 x 171, then columns 21..148.
  small = np.asarray(PIL.Image.fromarray(landscape).resize((171, 128), PIL.Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(datasets.prepare_lsun(landscape, 128), small[:, 21:149])
  portrait = np.ascontiguousarray(landscape.transpose(1, 0, 2))
  small = np.asarray(PIL.Image.fromarray(portrait).resize((128, 171), PIL.Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(datasets.prepare_lsun(portrait, 128), small[21:149])


def test_lsun_at_other_sizes_is_central_square_then_bicubic():
  image = np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)
  square = PIL.Image.fromarray(image[:, 25:175])
  expected = np.asarray(square.resize((16, 16), PIL.Image.Resampling.BICUBIC))
  prepared = datasets.prepare_lsun(image, 16)
  assert prepared.shape == (16, 16, 3) and prepared.dtype == np.uint8
  np.testing.assert_array_equal(prepared, expected)
  assert not np.array_equal(prepared, np.asarray(square.resize((16, 16), PIL.Image.Resampling.BILINEAR)))
  np.testing.assert_array_equal(datasets.prepare_lsun(image, 64), _lsun_with_pil(image, 64))


def test_celeba_rule_is_central_crop_140_then_resize_small():
  image = np.random.default_rng(2).integers(0, 256, (218, 178, 3), dtype=np.uint8)
  crop = PIL.Image.fromarray(image[39:179, 19:159])                     # top (218 - 140) // 2, left 19
  np.testing.assert_array_equal(datasets.prepare_celeba(image, 64),
                                np.asarray(crop.resize((64, 64), PIL.Image.Resampling.BILINEAR)))
  assert datasets.IMAGE_DATASETS["celeba"].prepare is datasets.prepare_celeba
  assert all(datasets.IMAGE_DATASETS[name].prepare is datasets.prepare_lsun
             for name in datasets.IMAGE_DATASETS if name.startswith("lsun/"))
  assert datasets.IMAGE_DATASETS["cifar10"].prepare is datasets.prepare_resize


def test_images_already_at_the_size_pass_untouched():
  rng = np.random.default_rng(3)
  for size in (16, 128):
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for prepare in (datasets.prepare_resize, datasets.prepare_lsun):
      np.testing.assert_array_equal(prepare(image, size), image)
  image = rng.integers(0, 256, (140, 140, 3), dtype=np.uint8)
  np.testing.assert_array_equal(datasets.prepare_celeba(image, 140), image)
  # The pipeline takes images at the size as prepared, even where the rule's crop would not fit.
  images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  pipeline = datasets.build_pipeline(datasets.ArraySource(images, np.zeros(6, np.int32)), name="small",
                                     batch_size=6, training=False, seed=0, image_size=16,
                                     prepare=datasets.prepare_celeba, process_index=0, process_count=1)
  batch = next(pipeline.make_iterator())
  np.testing.assert_array_equal(np.round(batch["image"] * 255).astype(np.uint8), images)
  # A rule that does not return (image_size, image_size) images is reported.
  with pytest.raises(ValueError, match=r"must return uint8 \(32, 32, C\)"):
    datasets.build_pipeline(datasets.ArraySource(images, np.zeros(6, np.int32)), name="small", batch_size=6,
                            training=False, seed=0, image_size=32, prepare=lambda image, size: image,
                            process_index=0, process_count=1)


@pytest.mark.parametrize("image_size", [128, 16])
def test_lsun_through_mock_data_follows_the_original_rule(image_size):
  config = _config("lsun/bedroom", image_size=image_size, random_flip=False)
  config.eval.batch_size = 4
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    source = tfds.data_source("lsun/bedroom", split="validation")   # JPEGs of random, non-square sizes
    _, eval_ds = datasets.get_dataset(config, evaluation=True)
    batch = next(eval_ds.make_iterator())
    expected = np.stack([_lsun_with_pil(np.asarray(source[i]["image"]), image_size) for i in range(4)])
  assert batch["image"].shape == (4, image_size, image_size, 3) and batch["mask"].all()
  np.testing.assert_array_equal(batch["label"], 0)                  # LSUN has no labels
  np.testing.assert_array_equal(np.round(batch["image"] * 255).astype(np.uint8), expected)


def test_image_folder_data_set(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(5):
    PIL.Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i:05d}.png")
  config = _config("FFHQ", image_size=12, random_flip=False, data_dir=str(tmp_path))
  config.eval.batch_size = 4
  train_ds, eval_ds = datasets.get_dataset(config, evaluation=True)
  assert train_ds.num_examples == eval_ds.num_examples == 5      # no held-out split: both are every image
  batches = list(eval_ds.make_iterator())
  first = np.asarray(PIL.Image.open(tmp_path / "00000.png"))
  np.testing.assert_array_equal(np.round(batches[0]["image"][0] * 255).astype(np.uint8), first)
  assert sum(int(b["mask"].sum()) for b in batches) == 5


def _mixed_folder(root, rng):
  """Seven images of different sizes, modes and formats (one in a subfolder); returns their paths."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "more").mkdir(exist_ok=True)
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  images = {"a_rgb_wide.png": PIL.Image.fromarray(rgb(10, 16)),
            "b_grey_tall.png": PIL.Image.fromarray(rng.integers(0, 256, (20, 12), dtype=np.uint8)),
            "c_rgba.png": PIL.Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)),
            "d_palette.png": PIL.Image.fromarray(rgb(14, 14)).convert("P"),
            "e_photo.jpg": PIL.Image.fromarray(rgb(9, 20)),
            "f_small.jpeg": PIL.Image.fromarray(rgb(5, 6)),
            "more/g_square.png": PIL.Image.fromarray(rgb(8, 8))}
  for name, image in images.items():
    image.save(root / name)
  return sorted(root / name for name in images)


def test_image_folder_of_mixed_sizes_and_modes_reads_lazily_and_crops_to_square(tmp_path):
  paths = _mixed_folder(tmp_path / "photos", np.random.default_rng(0))
  config = _config("image_folder", image_size=8, random_flip=False, data_dir=str(tmp_path / "photos"))
  config.eval.batch_size = 4
  train_ds, eval_ds = datasets.get_dataset(config, evaluation=True)
  assert train_ds.num_examples == 7 and "the training images themselves" in eval_ds.source_note
  source = datasets.folder_source("train", str(tmp_path / "photos"))
  assert isinstance(source, datasets.ImageFileSource)         # files, read when a batch needs them
  images = np.concatenate([b["image"][b["mask"]] for b in train_ds.make_iterator()])
  assert images.shape == (7, 8, 8, 3)
  # Each file: converted to RGB, its central square resized bilinearly (PIL, uint8).
  for image, path in zip(images, paths):
    with PIL.Image.open(path) as f:
      rgb = np.asarray(f.convert("RGBA").convert("RGB"))
    side = min(rgb.shape[:2])
    top, left = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
    expected = datasets._resize(rgb[top:top + side, left:left + side], 8, 8)
    np.testing.assert_array_equal(np.round(image * 255).astype(np.uint8), expected)
  # Greyscale on request: every mode becomes one channel.
  config.data.num_channels = 1
  assert next(datasets.get_dataset(config, evaluation=True)[0].make_iterator())["image"].shape == (4, 8, 8, 1)


def test_image_folder_held_out_splits(tmp_path):
  rng = np.random.default_rng(1)
  paths = _mixed_folder(tmp_path / "photos", rng)
  config = _config("image_folder", image_size=8, random_flip=False, data_dir=str(tmp_path / "photos"))
  config.data.test_fraction = 0.3                                     # round(0.3 * 7) = 2 held out
  train_ds, eval_ds = datasets.get_dataset(config, evaluation=True)
  assert (train_ds.num_examples, eval_ds.num_examples) == (5, 2) and "not used for training" in eval_ds.source_note
  train = datasets.folder_source("train", str(tmp_path / "photos"), test_fraction=0.3).paths
  test = datasets.folder_source("test", str(tmp_path / "photos"), test_fraction=0.3).paths
  assert sorted(train + test) == paths and not set(train) & set(test)
  # train/ and test/ folders are the splits.
  for split, n in (("train", 3), ("test", 2)):
    (tmp_path / "split" / split).mkdir(parents=True)
    for i in range(n):
      PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "split" / split / f"{i}.png")
  config.data.update(data_dir=str(tmp_path / "split"), test_fraction=0.0)
  train_ds, eval_ds = datasets.get_dataset(config, evaluation=True)
  assert (train_ds.num_examples, eval_ds.num_examples) == (3, 2) and "split/test" in eval_ds.source_note
  config.data.test_fraction = 1.0
  with pytest.raises(ValueError, match="test_fraction=1.0 holds out 7 of 7"):
    datasets.get_dataset(_config("image_folder", image_size=8, random_flip=False, data_dir=str(tmp_path / "photos"),
                                 test_fraction=1.0), evaluation=True)


def test_missing_or_empty_image_folder_says_so(tmp_path):
  config = _config("image_folder", image_size=8, random_flip=False, data_dir=str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="data_dir=.*absent does not exist"):
    datasets.get_dataset(config)
  (tmp_path / "empty").mkdir()
  config.data.data_dir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="No .tfrecords or image files"):
    datasets.get_dataset(config)
  (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
  source = datasets.folder_source("train", str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="broken.png is not a readable image"):
    source[0]


def test_image_folder_without_data_dir_says_what_to_set():
  with pytest.raises(FileNotFoundError, match="--config.data.data_dir"):
    datasets.get_dataset(_config("FFHQ", image_size=256, random_flip=False))


def test_crc32c_check_value():
  assert datasets._crc32c(b"123456789") == 0xE3069283   # the standard CRC-32C check value


def test_dataset_tool_tfrecords_without_tensorflow(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)          # CHW, as the tool stores them
  (tmp_path / "ffhq-r03.tfrecords").write_bytes(  # the benchmark's mock records: StyleGAN's dataset tool layout
      b"".join(bench_input.tfrecord(bench_input.dataset_tool_example(im)) for im in images))
  config = _config("FFHQ", image_size=8, random_flip=False, data_dir=str(tmp_path / "ffhq-r03.tfrecords"))
  config.eval.batch_size = 5
  _, eval_ds = datasets.get_dataset(config, evaluation=True)
  batch = next(eval_ds.make_iterator())
  np.testing.assert_array_equal(np.round(batch["image"] * 255).astype(np.uint8), images.transpose(0, 2, 3, 1))
  # A truncated file is reported, naming it.
  data = (tmp_path / "ffhq-r03.tfrecords").read_bytes()
  (tmp_path / "bad.tfrecords").write_bytes(data[:-50])
  with pytest.raises(ValueError, match="bad.tfrecords is truncated"):
    datasets.TFRecordSource([tmp_path / "bad.tfrecords"])


@pytest.mark.slow
def test_an_image_folder_of_mixed_sizes_and_modes_trains(tmp_path):
  from score_sde import train  # pylint: disable=g-import-not-at-top
  _mixed_folder(tmp_path / "photos", np.random.default_rng(2))
  config = _config("image_folder", image_size=8, random_flip=True, data_dir=str(tmp_path / "photos"),
                   test_fraction=0.3)
  t = config.training
  t.n_iters, t.batch_size, t.snapshot_sampling = 2, 4, False
  t.log_freq = t.eval_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = 1
  config.model.name, config.model.hidden_dims = "mlp", (16,)
  result = train.train(config, tmp_path / "run")
  assert result.step == 2 and np.isfinite(result.training_loss) and np.isfinite(result.eval_loss)
