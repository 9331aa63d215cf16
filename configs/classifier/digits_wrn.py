"""A noise-conditional classifier p(y | x_t, t) for the 8x8 digits (scikit-learn, no download).

WRN-10-2 (``models.classifier.small_wide_resnet``: one block per group, widths 32 / 64 / 128, 32
Fourier frequencies of log sigma_t), 10 classes, trained by cross-entropy on digits perturbed by the
VP SDE of ``configs/vp/digits_unet_continuous.py`` (same beta_min / beta_max, same [-1, 1] data),
x_t = alpha_t x_0 + sigma_t z with t ~ U(eps, 1): the classifier that guides that score model
(``--config.sampling.guidance=classifier --config.sampling.classifier_workdir=<this run's workdir>``).
Inputs are standardised per image inside the network, so no channel statistics are needed.
Eval metrics: loss and accuracy on a held-out batch, at random noise levels.
"""

from configs import default
from configs import presets


def get_config():
  config = presets.digits(default.get_default_configs())
  # Training: the classifier objective, under the score model's SDE.
  training = config.training
  training.objective = "classifier"
  training.sde = "vpsde"
  training.continuous = True
  training.snapshot_sampling = False
  training.final_evaluation = False

  # Noise: the VP SDE of the score model (model.beta_min / beta_max keep their defaults, 0.1 / 20).
  config.model.ema_rate = 0.999

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
  config.optim.grad_clip = 1.0
  return config
