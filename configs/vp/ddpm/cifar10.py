"""DDPM (Ho et al.'s U-Net) on CIFAR-10, VP SDE, discrete DDPM training: the original's vp/ddpm/cifar10."""

from configs import default_cifar10
from configs import presets


def get_config():
  return presets.ddpm(presets.vp(default_cifar10.get_default_configs(), continuous=False))
