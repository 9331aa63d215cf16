"""Sub-VP SDE on an anisotropic three-component mixture (an exact density), likelihood weighting."""

from configs import default_toy


def get_config():
  config = default_toy.get_default_configs()
  config.training.sde = "subvpsde"
  config.training.likelihood_weighting = True
  config.training.importance_weighting = True
  config.data.dataset = "mixture"
  config.sampling.method = "ode"
  return config
