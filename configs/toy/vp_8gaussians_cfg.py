"""Class-conditional VP SDE on eight Gaussians (label: the component), for classifier-free guidance.

The MLP adds a learned vector of the component k (or of the null class 8) to its noise embedding and
is trained with label dropout 0.2, so it learns both s(x, t | k), the score of component k, and the
unconditional score. ``--mode sample`` draws sample i from component i mod 8 with guidance weight
``sampling.guidance_scale`` = w (0: the conditional model; w > 0 tightens each component).
"""

from configs import default_toy


def get_config():
  config = default_toy.get_default_configs()
  config.training.sde = "vpsde"
  config.training.label_dropout = 0.2
  config.training.n_iters = 4000
  config.training.snapshot_freq = 2000
  config.data.dataset = "8gaussians"
  config.model.num_classes = 8
  config.sampling.method = "pc"
  config.sampling.predictor = "euler_maruyama"
  config.sampling.corrector = "none"
  config.sampling.guidance = "classifier_free"
  config.sampling.guidance_scale = 0.0
  return config
