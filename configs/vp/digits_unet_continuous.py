"""VP SDE on the 8x8 digits that ship with scikit-learn: a small U-Net, no download needed."""

from configs import default
from configs import presets


def get_config():
  config = presets.digits(default.get_default_configs())
  training = config.training
  training.sde = "vpsde"
  training.continuous = True
  training.reduce_mean = True
  training.final_evaluation = True

  # Sampling.
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "euler_maruyama"
  sampling.corrector = "none"
  sampling.num_steps = 500
  sampling.batch_size = 64

  # Evaluation: bits/dim of the held-out digits (Hutchinson divergence).
  evaluate = config.eval
  evaluate.enable_bpd = True
  evaluate.divergence = "rademacher"
  evaluate.num_samples = 64

  # Model.
  model = config.model
  model.name = "unet"
  model.nf = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = ()
  model.dropout = 0.0
  model.embedding_type = "positional"
  model.ema_rate = 0.999
  return config
