"""The blocks that configs share: an SDE recipe (``ve``, ``vp``), an architecture (``ddpm``, ``ncsnpp``,
``ddpmpp``) and the CPU schedule of the 8x8 digits (``digits``).

Each preset takes a config (a data set's defaults, or another preset's result), sets its block and returns it,
so a paper config is its data set's defaults, a recipe and an architecture, then only what differs::

  config = presets.ncsnpp(presets.ve(default_cifar10.get_default_configs(), continuous=True),
                          embedding_type="fourier")
"""

import ml_collections


def ve(config: ml_collections.ConfigDict, *, continuous: bool) -> ml_collections.ConfigDict:
  """The VE SDE (SMLD): DSM on sigma(t), or on the discrete table of noise levels; reverse-diffusion predictor
  with a Langevin corrector down to t = 1e-5; network output divided by sigma; EMA 0.999."""
  config.training.sde = "vesde"
  config.training.continuous = continuous
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "reverse_diffusion"
  sampling.corrector = "langevin"
  sampling.eps = 1e-5
  model = config.model
  model.scale_by_sigma = True
  model.ema_rate = 0.999
  model.discretization = "table"
  return config


def vp(config: ml_collections.ConfigDict, *, continuous: bool) -> ml_collections.ConfigDict:
  """The VP SDE (DDPM): loss averaged over dimensions, data in [-1, 1]; Euler-Maruyama (continuous) or DDPM's
  ancestral sampling (discrete), no corrector, down to t = 1e-3; EMA 0.9999."""
  training = config.training
  training.sde = "vpsde"
  training.continuous = continuous
  training.reduce_mean = True
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "euler_maruyama" if continuous else "ancestral_sampling"
  sampling.corrector = "none"
  sampling.eps = 1e-3
  config.data.centered = True
  model = config.model
  model.scale_by_sigma = False
  model.ema_rate = 0.9999
  model.discretization = "table"
  return config


def ddpm(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Ho et al.'s U-Net: 2 residual blocks per level of (1, 2, 2, 2) x 128 channels, GroupNorm and swish,
  attention at 16x16, learned resampling, noise-conditional."""
  model = config.model
  model.name = "ddpm"
  model.normalization = "GroupNorm"
  model.nonlinearity = "swish"
  model.nf = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  return config


def ncsnpp(config: ml_collections.ConfigDict, *, embedding_type: str) -> ml_collections.ConfigDict:
  """NCSN++ of the CIFAR-10 configs: the DDPM U-Net with 4 blocks per level, BigGAN resampling blocks with FIR
  filters, a residual input path and residual sums divided by sqrt(2).

  Args:
    embedding_type: of the noise level: "fourier" (VE, continuous sigma) | "positional".
  """
  config = ddpm(config)
  model = config.model
  model.name = "ncsnpp"
  model.num_res_blocks = 4
  model.fir = True
  model.fir_kernel = (1, 3, 3, 1)
  model.skip_rescale = True
  model.resblock_type = "biggan"
  model.progressive = "none"
  model.progressive_input = "residual"
  model.progressive_combine = "sum"
  model.init_scale = 0.0
  model.embedding_type = embedding_type
  model.fourier_scale = 16.0
  return config


def ddpmpp(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DDPM++: NCSN++ without FIR filters and without the input path, with positional embedding."""
  config = ncsnpp(config, embedding_type="positional")
  config.model.fir = False
  config.model.progressive_input = "none"
  return config


def digits(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The 8x8 digits of scikit-learn on a CPU: data in [-1, 1], dequantised; 3000 steps of batch 128, one optimiser
  step per compiled call; Adam 1e-3 with 200 warm-up steps; the 297 held-out digits as one evaluation batch."""
  training = config.training
  training.batch_size = 128
  training.n_iters = 3000
  training.n_jitted_steps = 1   # on CPU, convolutions inside a scan of several steps run ~15x slower
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_freq = 1000
  training.snapshot_freq_for_preemption = 500
  training.keep_checkpoints = 2
  config.eval.batch_size = 297
  data = config.data
  data.dataset = "digits"
  data.image_size = 8
  data.num_channels = 1
  data.random_flip = False
  data.centered = True
  data.uniform_dequantization = True
  config.optim.lr = 1e-3
  config.optim.warmup = 200
  return config
