"""NCSN++ cont. on FFHQ 1024x1024 (StyleGAN TFRecords in data.data_dir), VE SDE: the released FFHQ-1024 model."""

from configs.ve import celebahq_ncsnpp_continuous


def get_config():
  config = celebahq_ncsnpp_continuous.get_config()
  config.training.reduce_mean = True
  config.data.dataset = "FFHQ"
  return config
