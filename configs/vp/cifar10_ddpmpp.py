"""DDPM++ on CIFAR-10, VP SDE, discrete DDPM training: the original's vp/cifar10_ddpmpp."""

from configs import default_cifar10
from configs import presets


def get_config():
  return presets.ddpmpp(presets.vp(default_cifar10.get_default_configs(), continuous=False))
