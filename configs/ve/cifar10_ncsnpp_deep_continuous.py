"""NCSN++ cont. (deep, 8 blocks per level) on CIFAR-10, VE SDE: the paper's FID 2.20 / IS 9.89 model."""

from configs.ve import cifar10_ncsnpp_continuous


def get_config():
  config = cifar10_ncsnpp_continuous.get_config()
  config.training.n_iters = 950_001
  config.model.num_res_blocks = 8
  return config
