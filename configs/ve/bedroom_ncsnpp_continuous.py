"""NCSN++ cont. on LSUN bedroom 256x256 (TFDS lsun/bedroom), VE SDE: the original's ve/bedroom_ncsnpp_continuous."""

from configs import default_lsun
from configs import presets


def get_config():
  config = presets.ncsnpp(presets.ve(default_lsun.get_default_configs(), continuous=True), embedding_type="fourier")
  config.data.dataset = "lsun/bedroom"
  # Seven levels down to 4x4; progressive output (skip) and input (skip) paths.
  model = config.model
  model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
  model.num_res_blocks = 2
  model.progressive = "output_skip"
  model.progressive_input = "input_skip"
  return config
