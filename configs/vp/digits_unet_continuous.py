"""VP SDE on the 8x8 digits that ship with scikit-learn: a small U-Net, no download needed."""

from configs import default


def get_config():
  config = default.get_default_configs()
  # Training.
  training = config.training
  training.sde = "vpsde"
  training.continuous = True
  training.reduce_mean = True
  training.batch_size = 128
  training.n_iters = 3000
  training.n_jitted_steps = 1   # on CPU, convolutions inside a scan of several steps run ~15x slower
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_freq = 1000
  training.snapshot_freq_for_preemption = 500
  training.keep_checkpoints = 2
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
  evaluate.batch_size = 297
  evaluate.enable_bpd = True
  evaluate.divergence = "rademacher"
  evaluate.num_samples = 64

  # Data.
  data = config.data
  data.dataset = "digits"
  data.image_size = 8
  data.num_channels = 1
  data.random_flip = False
  data.centered = True
  data.uniform_dequantization = True

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

  # Optimisation.
  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 200
  return config
