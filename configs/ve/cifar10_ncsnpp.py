"""NCSN++ on CIFAR-10, VE SDE, discrete SMLD training (noise-level indices): the original's ve/cifar10_ncsnpp."""

from configs import default_cifar10
from configs import presets


def get_config():
  return presets.ncsnpp(presets.ve(default_cifar10.get_default_configs(), continuous=False),
                        embedding_type="positional")
