"""NCSNv2 on LSUN bedroom 128x128, VE SDE, 1086 noise levels from 190 to 0.01, batch 128 (83,445,379 params)."""

from configs import default_lsun
from configs.ve import ncsnv2


def get_config():
  config = ncsnv2.ncsnv2_config(default_lsun.get_default_configs(), name="ncsnv2_128", num_scales=1086,
                                sigma_max=190.0, ema_rate=0.9999, snr=0.095, n_steps_each=3)
  config.training.batch_size = 128
  config.data.dataset = "lsun/bedroom"
  config.data.image_size = 128
  return config
