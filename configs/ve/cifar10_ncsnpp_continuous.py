"""NCSN++ cont. on CIFAR-10, VE SDE: the paper's FID 2.38 / IS 9.83 model."""

from configs import default_cifar10
from configs import presets


def get_config():
  return presets.ncsnpp(presets.ve(default_cifar10.get_default_configs(), continuous=True), embedding_type="fourier")
