"""NCSNv2 on CelebA 64x64, VE SDE, 500 noise levels from 90 to 0.01, 5 Langevin steps a level (29,694,083 params)."""

from configs import default_celeba
from configs.ve import ncsnv2


def get_config():
  return ncsnv2.ncsnv2_config(default_celeba.get_default_configs(), name="ncsnv2_64", num_scales=500, sigma_max=90.0,
                              ema_rate=0.999, snr=0.128, n_steps_each=5)
