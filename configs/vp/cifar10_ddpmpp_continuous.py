"""DDPM++ cont. on CIFAR-10, VP SDE. The original's vp/cifar10_ddpmpp_continuous."""

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
  model.name = "ncsnpp"
  model.scale_by_sigma = False
  model.ema_rate = 0.9999
  model.discretization = "table"
  model.normalization = "GroupNorm"
  model.nonlinearity = "swish"
  model.nf = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 4
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  model.fir = False
  model.fir_kernel = (1, 3, 3, 1)
  model.skip_rescale = True
  model.resblock_type = "biggan"
  model.progressive = "none"
  model.progressive_input = "none"
  model.progressive_combine = "sum"
  model.init_scale = 0.0
  model.embedding_type = "positional"
  model.fourier_scale = 16.0
  return config
