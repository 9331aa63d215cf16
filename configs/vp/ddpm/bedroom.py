"""DDPM (Ho et al.'s U-Net) on LSUN bedroom 256x256 (TFDS lsun/bedroom), VP SDE, discrete DDPM
training, learning rate 2e-5. The original's vp/ddpm/bedroom.
"""

from configs import default_lsun


def get_config():
  config = default_lsun.get_default_configs()
  # Training.
  training = config.training
  training.sde = "vpsde"
  training.continuous = False
  training.reduce_mean = True

  # Sampling.
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "ancestral_sampling"
  sampling.corrector = "none"
  sampling.eps = 1e-3

  # Data.
  data = config.data
  data.dataset = "lsun/bedroom"
  data.image_size = 256
  data.centered = True

  # Model.
  model = config.model
  model.name = "ddpm"
  model.num_scales = 1000
  model.scale_by_sigma = False
  model.ema_rate = 0.9999
  model.discretization = "table"
  model.normalization = "GroupNorm"
  model.nonlinearity = "swish"
  model.nf = 128
  model.ch_mult = (1, 1, 2, 2, 4, 4)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True

  # Optimisation.
  config.optim.lr = 2e-5
  return config
