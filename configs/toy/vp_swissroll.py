"""VP SDE on a swiss roll, sampled with ancestral sampling."""

from configs import default_toy


def get_config():
  config = default_toy.get_default_configs()
  config.training.sde = "vpsde"
  config.data.dataset = "swissroll"
  config.sampling.predictor = "ancestral_sampling"
  config.sampling.corrector = "none"
  return config
