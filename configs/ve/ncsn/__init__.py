"""What every NCSN (v1) config shares: the network, discrete SMLD training, annealed Langevin sampling.

The eight configs reproduce the ablations of the NCSNv2 paper (Song & Ermon 2020) on the v1 network;
the suffix names the techniques applied: 1 (sigma_1 as large as the largest pairwise data distance),
2 (more, geometrically spaced noise levels), 4 (fewer Langevin steps per level at a tuned snr) and 5
(an EMA of the weights). Technique 3 (dividing the output by sigma) is NCSNv2's and is off here.

NCSN conditions every normalisation on the noise index, so its number of classes is the number of
noise levels: ``model.num_classes`` is declared as a reference to ``model.num_scales`` (overriding
either from the command line changes both).
"""

import ml_collections

from configs.ve import ncsnv2


def ncsn_config(defaults: ml_collections.ConfigDict, *, num_scales: int, sigma_max: float, ema_rate: float,
                snr: float, n_steps_each: int) -> ml_collections.ConfigDict:
  """``defaults`` (a data set's default config) set up for NCSN with the given ablation settings: the NCSNv2
  recipe (``ncsnv2.ncsnv2_config``) on the v1 network, without technique 3, with Adam 1e-3.

  Args:
    defaults: e.g. ``default_cifar10.get_default_configs()``; modified and returned.
    num_scales: number of noise levels N (and of the network's classes).
    sigma_max: the largest noise level (the smallest is 0.01).
    ema_rate: EMA decay of the weights (0: no EMA, the weights themselves are used).
    snr: annealed Langevin step size eps_i = 2 (snr sigma_i)^2.
    n_steps_each: Langevin steps per noise level.
  """
  config = ncsnv2.ncsnv2_config(defaults, name="ncsn", num_scales=num_scales, sigma_max=sigma_max,
                                ema_rate=ema_rate, snr=snr, n_steps_each=n_steps_each)
  config.model.scale_by_sigma = False
  config.model.num_classes = config.model.get_ref("num_scales")
  config.optim.lr = 1e-3
  return config
