"""The embedded colour digits (``digits_rgb``): the digits inked in a fixed colour per example."""

import numpy as np
import pytest

from configs import default
from score_sde import builders, datasets


def _config(**data):
  config = default.get_default_configs()
  config.data.dataset = "digits_rgb"
  config.data.update(data)
  return config


def test_each_example_is_its_grey_digit_inked_in_one_palette_colour():
  palette = datasets.DIGITS_PALETTE.astype(np.float64)
  for split in ("train", "test"):
    rgb, grey = datasets.digits_rgb_source(split), datasets.digits_source(split)
    assert rgb.images.shape == grey.images.shape[:-1] + (3,) and rgb.images.dtype == np.uint8
    np.testing.assert_array_equal(rgb.labels, grey.labels)
    # Example i is round(v c / 255) for its grey digit v and exactly one palette colour c.
    inked = np.round(grey.images[:, None].astype(np.float64) * palette[None, :, None, None, :] / 255)
    matches = np.all(inked == rgb.images[:, None], axis=(2, 3, 4))  # (N, colours)
    assert np.all(matches.sum(1) == 1)
    # Every colour is used, about equally often (a fair draw of 1500 or 297: within 5 sd).
    counts = matches.sum(0)
    p = 1 / len(palette)
    assert np.all(np.abs(counts - p * len(rgb)) < 5 * np.sqrt(len(rgb) * p * (1 - p)))
  # Fixed per example: the same colours on every call.
  np.testing.assert_array_equal(datasets.digits_rgb_source("test").images, rgb.images)


def test_digits_rgb_through_the_pipeline_and_the_config_checks():
  builders.validate(_config(num_channels=3, image_size=8))
  train_ds, eval_ds = datasets.get_dataset(_config(num_channels=3, image_size=8), evaluation=True)
  batch = next(eval_ds.make_iterator())
  assert batch["image"].shape == (512, 8, 8, 3) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and eval_ds.eight_bit
  assert batch["mask"].sum() == 297 and train_ds.num_batches == 3
  # Channels differ within a pixel: the images are coloured, not grey.
  assert np.abs(batch["image"][..., 0] - batch["image"][..., 1]).max() > 0.3
  with pytest.raises(ValueError, match="num_channels=3"):
    datasets.get_dataset(_config(num_channels=1, image_size=8))
