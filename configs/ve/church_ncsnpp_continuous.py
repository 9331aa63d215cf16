"""NCSN++ cont. on LSUN church_outdoor 256x256, VE SDE: the original's ve/church_ncsnpp_continuous."""

from configs.ve import bedroom_ncsnpp_continuous


def get_config():
  config = bedroom_ncsnpp_continuous.get_config()
  config.data.dataset = "lsun/church_outdoor"
  config.model.sigma_max = 380.0
  return config
