"""NCSN on CIFAR-10 with techniques 1, 2 and 4 of NCSNv2: 232 noise levels from 50 to 0.01, 5 Langevin
steps per level at snr 0.176, no EMA: the original's ve/ncsn/cifar10_124. 39,750,659 parameters.
"""

from configs import default_cifar10
from configs.ve import ncsn


def get_config():
  return ncsn.ncsn_config(default_cifar10.get_default_configs(), num_scales=232, sigma_max=50.0,
                          ema_rate=0.0, snr=0.176, n_steps_each=5)
