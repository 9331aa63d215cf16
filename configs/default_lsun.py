"""Defaults of the paper's 256 px configs (LSUN, FFHQ, CelebA-HQ): the original's ``default_lsun_configs``.

As ``default_cifar10`` except: batch 64, 2.4M iterations, preemption checkpoints every 5000 steps,
snr 0.075, evaluation batches of 512, 256 px images, sigma_max = 378, N = 2000, no dropout. The
configs set the data set (an LSUN category, FFHQ or CelebA-HQ).
"""

from configs import default_cifar10


def get_default_configs():
  config = default_cifar10.get_default_configs()
  # Training.
  training = config.training
  training.batch_size = 64
  training.n_iters = 2_400_001
  training.snapshot_freq_for_preemption = 5000

  config.sampling.snr = 0.075
  config.eval.batch_size = 512

  # Data.
  data = config.data
  data.dataset = "lsun/bedroom"
  data.image_size = 256

  # Model.
  model = config.model
  model.sigma_max = 378.0
  model.num_scales = 2000
  model.dropout = 0.0
  return config
