"""A noise-conditional classifier p(y | x_sigma, sigma) for the 8x8 digits (scikit-learn, no download).

WRN-10-2 (``models.classifier.small_wide_resnet``: one block per group, widths 32 / 64 / 128, 32
Fourier frequencies of log sigma), 10 classes. It is trained on digits perturbed with VE noise,
x + sigma z, sigma log-uniform on [model.sigma_min, model.sigma_max]; sigma_max = 5 is about the
largest pairwise distance between the digits in [0, 1] (4.8), the rule of thumb for the VE prior.
Class-conditional sampling uses it to guide a VE score model of the same data and noise range.
Inputs are standardised per image inside the network, so no channel statistics are needed.
"""

from configs import default


def get_config():
  config = default.get_default_configs()
  # Training.
  training = config.training
  training.sde = "vesde"
  training.batch_size = 128
  training.n_iters = 5000
  training.n_jitted_steps = 5
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_freq = 1000
  training.snapshot_freq_for_preemption = 500
  training.keep_checkpoints = 2
  training.snapshot_sampling = False

  # Evaluation: accuracy on the 297 held-out digits.
  config.eval.batch_size = 297

  # Data: the digits in [0, 1].
  data = config.data
  data.dataset = "digits"
  data.image_size = 8
  data.num_channels = 1
  data.random_flip = False
  data.centered = False
  data.uniform_dequantization = False

  # Noise levels the classifier sees.
  model = config.model
  model.sigma_min = 0.01
  model.sigma_max = 5.0

  # Classifier.
  classifier = config.classifier
  classifier.name = "wideresnet"
  classifier.depth = 10
  classifier.widen_factor = 2
  classifier.num_classes = 10
  classifier.embedding_size = 32
  classifier.fourier_scale = 16.0
  classifier.input_mean = ()
  classifier.input_std = ()

  # Optimisation.
  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 200
  optim.grad_clip = 1.0
  return config
