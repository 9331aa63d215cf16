"""NCSN++ cont. on CelebA-HQ 256x256 (StyleGAN TFRecords in data.data_dir), VE SDE."""

from configs.ve import bedroom_ncsnpp_continuous


def get_config():
  config = bedroom_ncsnpp_continuous.get_config()
  config.data.dataset = "CelebAHQ"
  config.model.sigma_max = 348.0
  return config
