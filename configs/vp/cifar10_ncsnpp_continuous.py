"""NCSN++ cont. on CIFAR-10, VP SDE: the original's vp/cifar10_ncsnpp_continuous."""

from configs import default_cifar10
from configs import presets


def get_config():
  return presets.ncsnpp(presets.vp(default_cifar10.get_default_configs(), continuous=True),
                        embedding_type="positional")
