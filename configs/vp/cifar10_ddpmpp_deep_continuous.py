"""DDPM++ cont. deep (8 blocks per level) on CIFAR-10, VP SDE: the original's vp/cifar10_ddpmpp_deep_continuous."""

from configs.vp import cifar10_ddpmpp_continuous


def get_config():
  config = cifar10_ddpmpp_continuous.get_config()
  config.training.n_iters = 950_001
  config.model.num_res_blocks = 8
  return config
