"""The memory report of ``--mode summary``: the loop's compiled train step, per device, without running it."""

import jax
import numpy as np
import pytest

from configs import default
from score_sde import builders
from score_sde import memory
from score_sde import parallel


def _config(name="mlp"):
  c = default.get_default_configs()
  c.data.dataset, c.data.random_flip = "mixture", False
  c.model.name, c.model.hidden_dims = name, (16,)
  c.training.batch_size, c.training.n_jitted_steps = 16, 1
  if name == "unet":  # a tiny U-Net on 8x8 digits: it offers remat and bfloat16
    c.data.dataset, c.data.image_size, c.data.num_channels = "digits", 8, 1
    c.model.nf, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_resolutions = 4, (1,), 1, ()
  return c


def test_the_report_is_the_training_loops_own_step_and_says_what_a_network_lacks():
  mesh = parallel.make_mesh()
  config = _config()
  rows = memory.variant_memory(config, mesh)
  assert [r.name for r in rows] == list(memory.VARIANTS)
  assert rows[0].per_device_batch == 16 and rows[0].total > rows[0].temporaries > 0 and not rows[0].refused
  assert all("has no" in r.refused for r in rows[1:])  # the MLP has neither remat nor dtype
  # The same figures as the program the training loop compiles.
  sde, network = builders.build_sde(config), builders.build_network(config)
  programs = builders.build_programs(config, mesh, sde, network, (2,), jax.random.key(0))
  key = jax.eval_shape(lambda: jax.random.key(0))
  batch = {"image": jax.ShapeDtypeStruct((16, 2), np.float32), "label": jax.ShapeDtypeStruct((16,), np.int32)}
  stats = programs.train.lower(key, programs.state_shapes, batch).compile().memory_analysis()
  assert (rows[0].arguments, rows[0].temporaries) == (stats.argument_size_in_bytes, stats.temp_size_in_bytes)
  text = memory.format_report(rows, limit_gb=1.0, largest=7)
  assert "cpu (1 x cpu)" in text and "not available" in text and "within 1 GiB (as configured): 7" in text


@pytest.mark.slow  # four compilations of a U-Net's train step: about 30 s on 2 cores
def test_remat_and_bfloat16_rows_of_a_network_that_offers_them():
  rows = memory.variant_memory(_config("unet"), parallel.make_mesh())
  assert not any(r.refused for r in rows)
  assert rows[2].temporaries <= rows[0].temporaries  # bfloat16 activations


@pytest.mark.parametrize("intercept,slope,curve", [(1000, 37, 0), (5000, 3, 1), (10, 1000, 0)])
def test_largest_fitting_batch(intercept, slope, curve):
  calls = []

  def total(b):
    calls.append(b)
    return intercept + slope * b + curve * b * b // 10

  limit = 100_000
  best = memory.largest_fitting(total, limit, guess=8)
  assert total(best) <= limit < total(best + 1)
  assert len(set(calls)) <= (5 if curve == 0 else 16)  # a line is found in one step: 1, 8, 16, its answer, +1
  assert memory.largest_fitting(lambda b: limit + b, limit, guess=8) == 0


def test_largest_batch_of_a_config(monkeypatch):
  compiled = []

  def step_memory(config, mesh, per_device_batch=None, name="as configured"):  # 1 MiB + 3 KiB per example
    compiled.append(per_device_batch)
    return memory.StepMemory(name, per_device_batch, arguments=2**20, temporaries=3 * 2**10 * per_device_batch)

  monkeypatch.setattr(memory, "step_memory", step_memory)
  batch, row = memory.largest_batch(_config(), parallel.make_mesh(), 2 * 2**20)
  assert batch == 2**20 // (3 * 2**10) and row.per_device_batch == batch and row.total <= 2 * 2**20
  assert compiled[:3] == [1, 16, 32] and len(compiled) == 5  # the line through 16 and 32, then its answer checked
