"""Defaults of the paper's CelebA configs (64 px): the original's ``default_celeba_configs``.

As ``default_cifar10`` except the data (CelebA, central crop 140 resized to 64), sigma_max = 90
and snr 0.17.
"""

from configs import default_cifar10


def get_default_configs():
  config = default_cifar10.get_default_configs()
  config.sampling.snr = 0.17

  # Data.
  data = config.data
  data.dataset = "CELEBA"
  data.image_size = 64
  data.num_workers = 3  # grain worker processes that keep up with one accelerator (experiments/README.md)

  # Model.
  config.model.sigma_max = 90.0
  return config
