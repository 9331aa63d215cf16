"""NCSN++ cont. on CelebA-HQ 1024x1024 (StyleGAN dataset_tool TFRecords at 1024 px, found under
config.data.data_dir), VE SDE. The original's ve/celebahq_ncsnpp_continuous, which only its PyTorch
port could run (it imported torch and had no n_jitted_steps); batch 8, one optimiser step per
compiled call.
"""

from configs import default_lsun


def get_config():
  config = default_lsun.get_default_configs()
  # Training.
  training = config.training
  training.sde = "vesde"
  training.continuous = True
  training.reduce_mean = False
  training.batch_size = 8
  training.n_jitted_steps = 1

  # Sampling.
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "reverse_diffusion"
  sampling.corrector = "langevin"
  sampling.eps = 1e-5
  sampling.snr = 0.15

  # Evaluation.
  config.eval.batch_size = 1024

  # Data.
  data = config.data
  data.dataset = "CelebAHQ"
  data.image_size = 1024

  # Model.
  model = config.model
  model.name = "ncsnpp"
  model.sigma_max = 1348.0
  model.num_scales = 2000
  model.dropout = 0.0
  model.scale_by_sigma = True
  model.ema_rate = 0.9999
  model.discretization = "table"
  model.normalization = "GroupNorm"
  model.nonlinearity = "swish"
  model.nf = 16
  model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
  model.num_res_blocks = 1
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
