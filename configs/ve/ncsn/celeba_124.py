"""NCSN on CelebA 64x64 with techniques 1, 2 and 4 of NCSNv2: 500 noise levels from 90 to 0.01, 5
Langevin steps per level at snr 0.128, no EMA: the original's ve/ncsn/celeba_124. 51,379,715
parameters.
"""

from configs import default_celeba
from configs.ve import ncsn


def get_config():
  return ncsn.ncsn_config(default_celeba.get_default_configs(), num_scales=500, sigma_max=90.0,
                          ema_rate=0.0, snr=0.128, n_steps_each=5)
