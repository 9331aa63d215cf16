"""NCSNv2 (128 px network) on LSUN bedroom 128x128 (TFDS lsun/bedroom), VE SDE (sigma_max 190), discrete
SMLD training on 1086 noise levels, batch 128: the original's ve/ncsnv2/bedroom.

83,445,379 parameters. The original's file set ``training.continuouse = False``; the misspelt key
left ``training.continuous`` at its default, True, so it silently trained in continuous mode while
its network looked up the discrete sigma table with float sigmas. Here training is discrete, as
intended, and a test checks that every key these configs set is declared in ``configs/default.py``,
so a misspelt key fails. Sampled with annealed Langevin dynamics (3 steps per level, snr 0.095).
"""

from configs import default_lsun


def get_config():
  config = default_lsun.get_default_configs()
  # Training.
  training = config.training
  training.batch_size = 128
  training.sde = "vesde"
  training.continuous = False

  # Sampling.
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "none"
  sampling.corrector = "ald"
  sampling.n_steps_each = 3
  sampling.snr = 0.095
  sampling.eps = 1e-5

  # Data.
  data = config.data
  data.dataset = "lsun/bedroom"
  data.image_size = 128

  # Model.
  model = config.model
  model.name = "ncsnv2_128"
  model.scale_by_sigma = True
  model.sigma_min = 0.01
  model.sigma_max = 190.0
  model.num_scales = 1086
  model.discretization = "table"
  model.ema_rate = 0.9999
  model.normalization = "InstanceNorm++"
  model.nonlinearity = "elu"
  model.nf = 128
  model.interpolation = "bilinear_align_corners"

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
