"""The DDPM U-Net trained with SMLD on CIFAR-10 (VE SDE, discrete), its output divided by sigma."""

from configs import default_cifar10
from configs import presets


def get_config():
  return presets.ddpm(presets.ve(default_cifar10.get_default_configs(), continuous=False))
