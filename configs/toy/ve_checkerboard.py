"""VE SDE on a checkerboard: reverse-diffusion predictor with a Langevin corrector."""

from configs import default_toy


def get_config():
  config = default_toy.get_default_configs()
  config.training.sde = "vesde"
  config.data.dataset = "checkerboard"
  config.model.sigma_min = 0.01
  config.model.sigma_max = 6.0   # about the largest distance between two points of the board
  config.sampling.predictor = "reverse_diffusion"
  config.sampling.corrector = "langevin"
  config.sampling.snr = 0.16
  config.sampling.eps = 1e-5
  return config
