"""NCSN on CelebA 64x64 with technique 5 of NCSNv2 only: as published (10 noise levels from 1 to 0.01,
100 Langevin steps per level) plus an EMA of the weights (0.999): the original's ve/ncsn/celeba_5.
30,117,635 parameters.
"""

from configs import default_celeba
from configs.ve import ncsn


def get_config():
  return ncsn.ncsn_config(default_celeba.get_default_configs(), num_scales=10, sigma_max=1.0,
                          ema_rate=0.999, snr=0.316, n_steps_each=100)
