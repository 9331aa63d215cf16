"""NCSNv2 on CIFAR-10, VE SDE, discrete SMLD training on 232 noise levels: the original's ve/ncsnv2/cifar10.

29,694,083 parameters. Sampled as the NCSNv2 paper does: annealed Langevin dynamics (no predictor, 5
corrector steps per level, snr 0.176), denoised output. The interpolation is the NCSNv2 authors'
align-corners bilinear, so the networks compute what the authors' do (their checkpoints load with
``models.ncsnv2.from_authors_state_dict``).
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
  sampling.predictor = "none"
  sampling.corrector = "ald"
  sampling.n_steps_each = 5
  sampling.snr = 0.176
  sampling.eps = 1e-5

  # Model.
  model = config.model
  model.name = "ncsnv2_64"
  model.scale_by_sigma = True
  model.sigma_min = 0.01
  model.sigma_max = 50.0
  model.num_scales = 232
  model.discretization = "table"
  model.ema_rate = 0.999
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
