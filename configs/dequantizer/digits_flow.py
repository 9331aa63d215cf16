"""A variational dequantiser q(u | x) for the digits score model of ``configs/vp/digits_unet_continuous.py``.

The flow (``models.dequantizer``) is trained on the variational bound of the frozen score model of
``dequantizer.score_workdir`` (default ``runs/digits``, the README's digits run), as in Song, Durkan, Murray &
Ermon (2021); evaluate it with ``--mode likelihood --config.eval.dequantizers="('uniform', 'variational')"
--config.eval.dequantizer_workdir=<this run's workdir>`` on the score model's config.
"""

from configs.vp import digits_unet_continuous


def get_config():
  config = digits_unet_continuous.get_config()
  training = config.training
  training.objective = "dequantizer"
  training.snapshot_sampling = False
  training.final_evaluation = False
  training.n_iters = 600
  training.batch_size = 64
  training.log_freq = 50
  training.eval_freq = 200
  training.snapshot_freq = 200
  training.snapshot_freq_for_preemption = 100
  config.data.uniform_dequantization = False   # the flow sees the 8-bit images themselves
  dequantizer = config.dequantizer
  dequantizer.score_workdir = "runs/digits"
  dequantizer.features = 32
  dequantizer.num_steps = 2
  dequantizer.time_samples = 4   # bound times per image and step (64 x 4 per step)
  config.optim.warmup = 100
  return config
