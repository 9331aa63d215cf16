"""DDPM on LSUN church_outdoor 256x256, VP SDE, discrete DDPM training: the original's vp/ddpm/church."""

from configs.vp.ddpm import bedroom


def get_config():
  config = bedroom.get_config()
  config.data.dataset = "lsun/church_outdoor"
  return config
