"""Defaults for the toy 2-D data sets: a small MLP that trains in a couple of minutes on a CPU."""

from configs import default


def get_default_configs():
  config = default.get_default_configs()
  # Training.
  training = config.training
  training.batch_size = 512
  training.n_iters = 8000
  training.n_jitted_steps = 10
  training.log_freq = 200
  training.eval_freq = 500
  training.snapshot_freq = 4000
  training.snapshot_freq_for_preemption = 1000
  training.keep_checkpoints = 2
  training.reduce_mean = True
  training.final_evaluation = True

  # Sampling.
  sampling = config.sampling
  sampling.batch_size = 2048
  sampling.num_steps = 500

  # Evaluation: likelihoods of the held-out points, with the exact divergence (D = 2).
  evaluate = config.eval
  evaluate.batch_size = 1000
  evaluate.divergence = "exact"
  evaluate.num_samples = 2048

  # Data.
  data = config.data
  data.dataset = "8gaussians"
  data.image_size = 0
  data.num_channels = 0
  data.random_flip = False
  data.centered = False
  data.uniform_dequantization = False

  # Model.
  model = config.model
  model.name = "mlp"
  model.hidden_dims = (128, 128, 128)
  model.fourier_scale = 1.0
  model.dropout = 0.0
  model.ema_rate = 0.999
  model.sigma_min = 0.01
  model.sigma_max = 5.0

  # Optimisation.
  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 100
  optim.grad_clip = 1.0
  return config
