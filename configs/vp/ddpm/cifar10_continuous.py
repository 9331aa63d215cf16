"""DDPM (Ho et al.'s U-Net) on CIFAR-10, continuous VP SDE: the original's vp/ddpm/cifar10_continuous."""

from configs import default_cifar10
from configs import presets


def get_config():
  return presets.ddpm(presets.vp(default_cifar10.get_default_configs(), continuous=True))
