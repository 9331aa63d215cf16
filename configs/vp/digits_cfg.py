"""Class-conditional VP SDE on the 8x8 digits, for classifier-free guidance (Ho & Salimans 2022).

The U-Net of ``digits_unet_continuous`` with a learned embedding of the digit class (or of the null
class 10) added to its noise embedding, trained with label dropout 0.1; ``--mode sample`` draws
sample i as digit i mod 10 (or ``sampling.class_labels``) with guidance weight w = 1:
(1 + w) s(x, t | y) - w s(x, t), one network call on the doubled batch per step.

Measured on 2 shared CPU cores: 400 steps (1.5 steps/s) already give the snapshot's conditional
samples (w = 0, sample i of class i mod 10) as recognisable digits of their classes.
"""

from configs.vp import digits_unet_continuous


def get_config():
  config = digits_unet_continuous.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.model.ema_warmup = True   # decay min(0.999, (1 + n) / (10 + n)): a short run's EMA is already usable
  config.training.n_iters = 2000
  config.sampling.guidance = "classifier_free"
  config.sampling.guidance_scale = 1.0
  config.sampling.num_steps = 250
  config.eval.num_samples = 100
  return config
