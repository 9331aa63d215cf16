"""NCSN as published (Song & Ermon 2019) on CelebA 64x64: 10 noise levels from 1 to 0.01, no EMA,
100 Langevin steps per level: the original's ve/ncsn/celeba. 30,117,635 parameters.

The original's file set ``training.loss`` instead of ``training.sde``, so it never selected the VE
SDE; here it does.
"""

from configs import default_celeba
from configs.ve import ncsn


def get_config():
  return ncsn.ncsn_config(default_celeba.get_default_configs(), num_scales=10, sigma_max=1.0,
                          ema_rate=0.0, snr=0.316, n_steps_each=100)
