"""NCSN++ on CelebA 64x64, VE SDE, discrete SMLD training (noise-level indices): the original's ve/celeba_ncsnpp."""

from configs import default_celeba
from configs import presets


def get_config():
  return presets.ncsnpp(presets.ve(default_celeba.get_default_configs(), continuous=False),
                        embedding_type="positional")
