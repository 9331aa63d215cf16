"""VP SDE on eight Gaussians (an exact density, so the likelihood can be checked): the quick start."""

from configs import default_toy


def get_config():
  config = default_toy.get_default_configs()
  config.training.sde = "vpsde"
  config.data.dataset = "8gaussians"
  config.sampling.method = "pc"
  config.sampling.predictor = "euler_maruyama"
  config.sampling.corrector = "none"
  return config
