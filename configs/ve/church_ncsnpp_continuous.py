"""NCSN++ cont. on LSUN church_outdoor 256x256 (TFDS lsun/church_outdoor), VE SDE. The original's
ve/church_ncsnpp_continuous.
"""

from configs import default_lsun


def get_config():
  config = default_lsun.get_default_configs()
  # Training.
  training = config.training
  training.sde = "vesde"
  training.continuous = True

  # Sampling.
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "reverse_diffusion"
  sampling.corrector = "langevin"
  sampling.eps = 1e-5

  # Data.
  data = config.data
  data.dataset = "lsun/church_outdoor"
  data.image_size = 256

  # Model.
  model = config.model
  model.name = "ncsnpp"
  model.sigma_max = 380.0
  model.scale_by_sigma = True
  model.ema_rate = 0.999
  model.discretization = "table"
  model.normalization = "GroupNorm"
  model.nonlinearity = "swish"
  model.nf = 128
  model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  model.fir = True
  model.fir_kernel = (1, 3, 3, 1)
  model.skip_rescale = True
  model.resblock_type = "biggan"
  model.progressive = "output_skip"
  model.progressive_input = "input_skip"
  model.progressive_combine = "sum"
  model.init_scale = 0.0
  model.embedding_type = "fourier"
  model.fourier_scale = 16.0
  return config
