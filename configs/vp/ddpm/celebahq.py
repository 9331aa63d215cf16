"""DDPM on CelebA-HQ 256x256 (TFRecords in data.data_dir), VP SDE, discrete DDPM training, lr 2e-5."""

from configs.vp.ddpm import bedroom


def get_config():
  config = bedroom.get_config()
  config.data.dataset = "CelebAHQ"
  return config
