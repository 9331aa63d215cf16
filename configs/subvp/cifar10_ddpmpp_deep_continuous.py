"""DDPM++ cont. deep on CIFAR-10, sub-VP SDE: the original's subvp/cifar10_ddpmpp_deep_continuous."""

from configs.vp import cifar10_ddpmpp_deep_continuous


def get_config():
  config = cifar10_ddpmpp_deep_continuous.get_config()
  config.training.sde = "subvpsde"
  config.model.discretization = "grid"  # sub-VP has no discretisation table: samplers use the grid rule
  return config
