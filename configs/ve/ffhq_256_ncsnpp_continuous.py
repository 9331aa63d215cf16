"""NCSN++ cont. on FFHQ 256x256 (StyleGAN TFRecords in data.data_dir), VE SDE."""

from configs.ve import celebahq_256_ncsnpp_continuous


def get_config():
  config = celebahq_256_ncsnpp_continuous.get_config()
  config.data.dataset = "FFHQ"
  return config
