"""What every NCSNv2 config shares (Song & Ermon 2020): discrete SMLD training on a table of noise levels, annealed
Langevin dynamics alone, Adam 1e-4 without warm-up or clipping, the RefineNet with InstanceNorm++ and ELU.

The interpolation is the NCSNv2 authors' align-corners bilinear, so the networks compute what theirs do (their
checkpoints load with ``models.ncsnv2.from_authors_state_dict``). Departures from the original's files: its
bedroom set ``training.continuouse = False``, and the misspelt key left ``training.continuous`` at True (continuous
training while the network looked up the discrete sigma table with float sigmas); here training is discrete, as
intended, and tests/test_ncsn_models.py checks that every key these configs set is declared in configs/default.py.
Its celeba held unused local variables (among them ``noise_removal = False``) that never reached the config;
samples are denoised here too.
"""

import ml_collections


def ncsnv2_config(defaults: ml_collections.ConfigDict, *, name: str, num_scales: int, sigma_max: float,
                  ema_rate: float, snr: float, n_steps_each: int) -> ml_collections.ConfigDict:
  """``defaults`` (a data set's default config) set up for an NCSNv2 network with the given settings.

  Args:
    defaults: e.g. ``default_cifar10.get_default_configs()``; modified and returned.
    name: the network (``models.MODELS``), e.g. "ncsnv2_64".
    num_scales: number of noise levels N.
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

  # Model: the output divided by sigma (technique 3 of NCSNv2).
  model = config.model
  model.name = name
  model.scale_by_sigma = True
  model.sigma_min = 0.01
  model.sigma_max = sigma_max
  model.num_scales = num_scales
  model.discretization = "table"
  model.ema_rate = ema_rate
  model.normalization = "InstanceNorm++"
  model.nonlinearity = "elu"
  model.nf = 128
  model.interpolation = "bilinear_align_corners"  # the NCSN authors' upsampling

  # Optimisation: Adam 1e-4, no warm-up, no clipping.
  optim = config.optim
  optim.optimizer = "Adam"
  optim.lr = 1e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup = 0
  optim.grad_clip = -1.0
  return config
