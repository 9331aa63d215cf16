"""DDPM (Ho et al.'s U-Net) on CIFAR-10, continuous VP SDE. The original's vp/ddpm/cifar10_continuous."""

from configs import default_cifar10


def get_config():
  config = default_cifar10.get_default_configs()
  # Training.
  training = config.training
  training.sde = "vpsde"
  training.continuous = True
  training.reduce_mean = True

  # Sampling.
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "euler_maruyama"
  sampling.corrector = "none"
  sampling.eps = 1e-3

  # Data.
  data = config.data
  data.centered = True

  # Model.
  model = config.model
  model.name = "ddpm"
  model.scale_by_sigma = False
  model.ema_rate = 0.9999
  model.discretization = "table"
  model.normalization = "GroupNorm"
  model.nonlinearity = "swish"
  model.nf = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  return config
