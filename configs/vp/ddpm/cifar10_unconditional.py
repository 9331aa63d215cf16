"""DDPM without noise conditioning on CIFAR-10, VP SDE, discrete DDPM training."""

from configs.vp.ddpm import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.conditional = False
  return config
