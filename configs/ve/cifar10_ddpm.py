"""The DDPM U-Net trained with SMLD (VE SDE, discrete) on CIFAR-10, its output divided by sigma. The
original's ve/cifar10_ddpm.
"""

from configs import default_cifar10


def get_config():
  config = default_cifar10.get_default_configs()
  # Training.
  training = config.training
  training.sde = "vesde"
  training.continuous = False

  # Sampling.
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "reverse_diffusion"
  sampling.corrector = "langevin"
  sampling.eps = 1e-5

  # Model.
  model = config.model
  model.name = "ddpm"
  model.scale_by_sigma = True
  model.ema_rate = 0.999
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
