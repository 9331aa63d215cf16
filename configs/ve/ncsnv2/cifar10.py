"""NCSNv2 on CIFAR-10, VE SDE, 232 noise levels from 50 to 0.01, 5 Langevin steps a level (29,694,083 params)."""

from configs import default_cifar10
from configs.ve import ncsnv2


def get_config():
  return ncsnv2.ncsnv2_config(default_cifar10.get_default_configs(), name="ncsnv2_64", num_scales=232, sigma_max=50.0,
                              ema_rate=0.999, snr=0.176, n_steps_each=5)
