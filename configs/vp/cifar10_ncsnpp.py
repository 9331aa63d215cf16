"""NCSN++ on CIFAR-10, VP SDE, discrete DDPM training: the original's vp/cifar10_ncsnpp."""

from configs import default_cifar10
from configs import presets


def get_config():
  config = presets.ncsnpp(presets.vp(default_cifar10.get_default_configs(), continuous=False),
                          embedding_type="positional")
  config.sampling.predictor = "reverse_diffusion"
  return config
