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


def ncsn_config(defaults: ml_collections.ConfigDict, *, num_scales: int, sigma_max: float, ema_rate: float,
                snr: float, n_steps_each: int) -> ml_collections.ConfigDict:
  """``defaults`` (a data set's default config) set up for NCSN with the given ablation settings.

  Args:
    defaults: e.g. ``default_cifar10.get_default_configs()``; modified and returned.
    num_scales: number of noise levels N (and of the network's classes).
    sigma_max: the largest noise level (the smallest is 0.01).
    ema_rate: EMA decay of the weights (0: no EMA, the weights themselves are used).
    snr: annealed Langevin step size eps_i = 2 (snr sigma_i)^2.
    n_steps_each: Langevin steps per noise level.
  """
  config = defaults
  # Training: discrete SMLD loss on the table of N noise levels.
  training = config.training
  training.sde = "vesde"
  training.continuous = False

  # Sampling: annealed Langevin dynamics alone (no predictor), denoised output.
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "none"
  sampling.corrector = "ald"
  sampling.n_steps_each = n_steps_each
  sampling.snr = snr
  sampling.eps = 1e-5

  # Model.
  model = config.model
  model.name = "ncsn"
  model.scale_by_sigma = False
  model.sigma_min = 0.01
  model.sigma_max = sigma_max
  model.num_scales = num_scales
  model.num_classes = model.get_ref("num_scales")
  model.discretization = "table"
  model.ema_rate = ema_rate
  model.normalization = "InstanceNorm++"
  model.nonlinearity = "elu"
  model.nf = 128
  model.interpolation = "bilinear_align_corners"  # the NCSN authors' upsampling

  # Optimisation: Adam 1e-3, no warm-up, no clipping.
  optim = config.optim
  optim.optimizer = "Adam"
  optim.lr = 1e-3
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup = 0
  optim.grad_clip = -1.0
  return config
