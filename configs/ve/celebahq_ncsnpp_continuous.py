"""NCSN++ cont. on CelebA-HQ 1024x1024 (TFRecords in data.data_dir), VE SDE: the paper's 1024 px samples."""

from configs import default_lsun
from configs import presets


def get_config():
  config = presets.ncsnpp(presets.ve(default_lsun.get_default_configs(), continuous=True), embedding_type="fourier")
  # The original's file ran only in its PyTorch port (no n_jitted_steps): batch 8, one step per compiled call.
  config.training.batch_size = 8
  config.training.n_jitted_steps = 1
  config.sampling.snr = 0.15
  config.eval.batch_size = 1024
  config.data.dataset = "CelebAHQ"
  config.data.image_size = 1024
  config.data.num_workers = 5  # 1024 px TFRecords: about 67 images per second per worker (experiments/README.md)
  # Eight levels of 16 to 512 channels down to 8x8; progressive output (skip) and input (skip) paths.
  model = config.model
  model.sigma_max = 1348.0
  model.ema_rate = 0.9999
  model.nf = 16
  model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
  model.num_res_blocks = 1
  model.progressive = "output_skip"
  model.progressive_input = "input_skip"
  return config
