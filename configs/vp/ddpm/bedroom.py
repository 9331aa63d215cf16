"""DDPM on LSUN bedroom 256x256 (TFDS lsun/bedroom), VP SDE, discrete DDPM training: the original's vp/ddpm/bedroom."""

from configs import default_lsun
from configs import presets


def get_config():
  config = presets.ddpm(presets.vp(default_lsun.get_default_configs(), continuous=False))
  config.data.dataset = "lsun/bedroom"
  config.model.num_scales = 1000
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.optim.lr = 2e-5
  return config
