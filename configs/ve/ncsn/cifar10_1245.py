"""NCSN on CIFAR-10 with techniques 1, 2, 4 and 5 of NCSNv2: 232 noise levels from 50 to 0.01, 5
Langevin steps per level at snr 0.176, EMA 0.999: the original's ve/ncsn/cifar10_1245. 39,750,659
parameters.

The original's file also held unused local variables (among them ``noise_removal = False``) that
never reached the config; samples are denoised, as in the other configs.
"""

from configs import default_cifar10
from configs.ve import ncsn


def get_config():
  return ncsn.ncsn_config(default_cifar10.get_default_configs(), num_scales=232, sigma_max=50.0,
                          ema_rate=0.999, snr=0.176, n_steps_each=5)
