"""Defaults of the paper's CIFAR-10 configs (32 px): the original's ``default_cifar10_configs``.

Training: batch 128, 1.3M iterations, 5 optimiser steps per compiled call, 0.5 * sum loss,
continuous time. Sampling: one corrector step, snr 0.16, denoised output. Evaluation: batches of
1024, 50,000 samples. Data in [0, 1]. Adam 2e-4 with 5000 warm-up steps and clipping at norm 1.
The per-architecture configs under ``ve/``, ``vp/`` and ``subvp/`` override what they change.
"""

from configs import default


def get_default_configs():
  config = default.get_default_configs()
  # Training.
  training = config.training
  training.batch_size = 128
  training.n_iters = 1_300_001
  training.n_jitted_steps = 5
  training.snapshot_freq = 50_000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 10_000
  training.snapshot_sampling = True
  training.likelihood_weighting = False
  training.continuous = True
  training.reduce_mean = False

  # Sampling.
  sampling = config.sampling
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16

  # Evaluation.
  evaluate = config.eval
  evaluate.batch_size = 1024
  evaluate.num_samples = 50_000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = "test"

  # Data.
  data = config.data
  data.dataset = "CIFAR10"
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  data.num_workers = 2  # grain worker processes that keep up with one accelerator (experiments/README.md)

  # Model: noise schedules and regularisation shared by every CIFAR-10 network.
  model = config.model
  model.sigma_min = 0.01
  model.sigma_max = 50.0
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.0
  model.dropout = 0.1
  model.embedding_type = "fourier"

  # Optimisation.
  optim = config.optim
  optim.optimizer = "Adam"
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup = 5000
  optim.grad_clip = 1.0
  return config
