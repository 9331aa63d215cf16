"""The main job: CLI modes end to end, inference on a trained run, and clear errors for bad input."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest

from configs.toy import vp_8gaussians
from configs.vp import digits_unet_continuous
from score_sde import convert
from score_sde import datasets
from score_sde import evaluate
from score_sde import train
from score_sde import builders
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A run of 20 steps, 2 per call, small sampling and likelihood passes: the CLI's shape, quickly.
TINY = ("--config.training.n_iters=20", "--config.training.n_jitted_steps=2", "--config.training.log_freq=10",
        "--config.training.eval_freq=10", "--config.training.snapshot_freq=20",
        "--config.training.snapshot_freq_for_preemption=10", "--config.training.batch_size=64",
        "--config.model.hidden_dims=(32,32)", "--config.sampling.num_steps=20", "--config.sampling.batch_size=64",
        "--config.eval.num_samples=100", "--config.eval.batch_size=50", "--config.eval.likelihood_examples=100",
        "--config.data.num_train=1000")


@pytest.fixture(scope="module", autouse=True)
def cli_compilation_cache(tmp_path_factory):
  """The main.py runs of this module compile fast and share a persistent compilation cache: a later
  run (eval after train) loads the programs an earlier one compiled instead of compiling them again.
  Their networks are tiny, so compiling, not running, is what takes their time."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("XLA_FLAGS", helpers.FAST_COMPILE_FLAGS)
    patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("cli_cache")))
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    yield


def run_main(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def tiny_toy_config():
  c = vp_8gaussians.get_config()
  t = c.training
  t.n_iters, t.n_jitted_steps, t.batch_size = 8, 1, 32
  t.log_freq, t.eval_freq, t.snapshot_freq, t.snapshot_freq_for_preemption = 4, 4, 8, 4
  t.snapshot_sampling = False
  c.model.hidden_dims = (16, 16)
  c.data.num_train = 500
  c.sampling.num_steps, c.sampling.batch_size = 10, 16
  c.eval.batch_size, c.eval.num_samples = 16, 40
  return c


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  config = tiny_toy_config()
  workdir = tmp_path_factory.mktemp("toy_run")
  train.train(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_cli_train_then_eval_and_summary(tmp_path):
  workdir = tmp_path / "run"
  proc = run_main("--config", "configs/toy/vp_8gaussians.py", "--workdir", str(workdir), "--mode", "train", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Training progress, then the final evaluation: samples and the held-out likelihood.
  assert "steps/s" in proc.stderr and "ETA" in proc.stderr
  # Quiet: no probe of absent backends, no Orbax records below warnings.
  assert "initialize backend" not in proc.stderr and "CheckpointManager" not in proc.stderr, proc.stderr[-3000:]
  assert "trained to step 20" in proc.stdout
  assert "100 samples (20 score evaluations each, 0 non-finite)" in proc.stdout
  assert "likelihood of 100 test examples" in proc.stdout and "nats" in proc.stdout
  assert "the data's exact density" in proc.stdout
  pc = "samples_20_pc-euler_maruyama-none-20"               # outputs name their setting
  assert PIL.Image.open(workdir / "eval" / f"{pc}.png").size[0] > 100
  assert np.load(workdir / "eval" / f"{pc}.npz")["samples"].shape == (100, 2)
  assert np.load(workdir / "eval" / "likelihood_test_20_exact-tol1e-05-eps1e-05.npz")["values"].shape == (100,)
  assert json.loads((workdir / "config.json").read_text())["training"]["n_iters"] == 20
  pc_picture = (workdir / "eval" / f"{pc}.png").read_bytes()

  # Every sampler from flags: UniPC at 10 evaluations writes beside the PC samples, which stay.
  proc = run_main("--config", "configs/toy/vp_8gaussians.py", "--workdir", str(workdir), "--mode", "sample", *TINY,
                  "--config.sampling.method=unipc", "--config.sampling.nfe=10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "100 samples (10 score evaluations each, 0 non-finite)" in proc.stdout
  assert np.load(workdir / "eval" / "samples_20_unipc-nfe10.npz")["samples"].shape == (100, 2)
  assert (workdir / "eval" / f"{pc}.png").read_bytes() == pc_picture
  # The same command again keeps the result; other settings under the same name are refused.
  proc = run_main("--config", "configs/toy/vp_8gaussians.py", "--workdir", str(workdir), "--mode", "sample", *TINY,
                  "--config.sampling.method=unipc", "--config.sampling.nfe=10")
  assert proc.returncode == 0 and "kept from an earlier run" in proc.stdout, proc.stderr[-3000:]
  proc = run_main("--config", "configs/toy/vp_8gaussians.py", "--workdir", str(workdir), "--mode", "sample", *TINY,
                  "--config.sampling.method=unipc", "--config.sampling.nfe=10", "--config.eval.num_samples=60")
  assert proc.returncode == 1 and "holds a result of other settings (num_samples differ)" in proc.stderr
  assert "Traceback" not in proc.stderr

  # Evaluation with three samplers: one row per checkpoint and sampler.
  proc = run_main("--config", "configs/toy/vp_8gaussians.py", "--workdir", str(workdir), "--mode", "eval",
                  "--eval_folder", "eval2", *TINY, "--config.eval.enable_sampling=True",
                  "--config.eval.samplers=('pc', 'euler:nfe=5', 'unipc:nfe=10,order=2')")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((workdir / "eval2" / "summary.json").read_text())
  assert [(row["step"], row["sampler"], row["nfe"]) for row in rows] == [   # checkpoint 1 = step 1 * snapshot_freq
      (20, "pc-euler_maruyama-none-20", 20), (20, "euler-nfe5", 5), (20, "unipc-nfe10-order2", 10)]
  for row in rows:
    assert np.isfinite(row["eval_loss"]) and np.isfinite(row["logp_nats"]) and row["energy_distance"] > 0
    assert row["sample_logp"] < 0                           # the exact density of the samples, in nats
  assert "eval_loss" in proc.stdout and len((workdir / "eval2" / "summary.csv").read_text().splitlines()) == 4

  proc = run_main("--config", "configs/vp/digits_unet_continuous.py", "--mode", "summary")
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(line for line in proc.stdout.splitlines() if line.startswith("parameters: "))
  assert int(line.split()[1]) > 1000
  assert "training:" in proc.stdout                         # the resolved config follows


# Bad input on the command line: (arguments after --config, the message). ``{tmp}`` is the test's directory.
BAD_INPUT = {
    "misspelt override": (("--config.training.batch_sise=3",),
                          "unknown config field training.batch_sise; did you mean training.batch_size?"),
    "misspelt config file": (("--config=configs/toy/vp_8gaussian.py",),
                             "config file configs/toy/vp_8gaussian.py does not exist; did you mean "
                             "configs/toy/vp_8gaussians.py?"),
    "value of the wrong type": (("--config.training.batch_size=abc",), "invalid literal for int()"),
    "unknown name": (("--config.training.sde=vpsd",), "config.training.sde='vpsd' is not one of"),
    "unknown predictor": (("--config.sampling.predictor=euler",),
                          "config.sampling.predictor='euler': Unknown predictor 'euler'; valid choices"),
    "impossible sampler option": (("--config.sampling.method=unipc", "--config.sampling.order=5"),
                                  "config.sampling.order=5"),
    "workdir is a file": (("--workdir={tmp}/file",), "is a file, not a directory"),
    "nothing trained": (("--workdir={tmp}/run", "--mode=sample"), "holds no checkpoint, so there is nothing to "
                                                                  "sample; train there first"),
    "missing image folder": (("--config.data.dataset=image_folder", "--config.data.data_dir={tmp}/photos",
                              "--config.data.image_size=8", "--config.data.num_channels=3", "--config.model.name=unet",
                              "--workdir={tmp}/run"), "{tmp}/photos does not exist"),
    "missing weights": (("--mode=import", "--source={tmp}/checkpoint_8.pth", "--workdir={tmp}/run"),
                        "--source {tmp}/checkpoint_8.pth does not exist"),
    "import without a source": (("--mode=import", "--workdir={tmp}/run"), "--mode=import needs --source"),
}


# Runs main.py's entry point once per case in one fresh process (JAX is imported once), as the command line
# would: absl's flags are reset between cases; stderr and the exit status are recorded per case.


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bad_input")
  (tmp / "file").write_text("")
  cases = {}
  for case, (args, _) in BAD_INPUT.items():
    args = [a.format(tmp=tmp / case.replace(" ", "_")) for a in args]
    if not any(a.startswith("--workdir") for a in args):
      args.append(f"--workdir={tmp / case.replace(' ', '_')}/run")
    (tmp / case.replace(" ", "_")).mkdir()
    (tmp / case.replace(" ", "_") / "file").write_text("")
    cases[case] = ["--config", "configs/toy/vp_8gaussians.py", *args]
  return tmp, helpers.run_entry_point(cases, cwd=ROOT)


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_cli_bad_input_is_a_short_message(case, bad_input_runs):
  tmp, runs = bad_input_runs
  run, message = runs[case], BAD_INPUT[case][1].format(tmp=tmp / case.replace(" ", "_"))
  assert run["code"] in (1, 2), run
  assert message in run["stderr"], run["stderr"]
  assert "Traceback" not in run["stderr"] and len(run["stderr"].strip().splitlines()) <= 4, run["stderr"]
  assert not (tmp / case.replace(" ", "_") / "run" / "checkpoints").exists()     # refused before anything ran


@pytest.mark.slow
def test_cli_show_traceback_shows_where_an_error_was_raised(tmp_path):
  proc = run_main("--config", "configs/toy/vp_8gaussians.py", f"--workdir={tmp_path}", "--config.training.sde=vpsd",
                  "--show_traceback", timeout=120)
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "builders.py" in proc.stderr


@pytest.mark.slow
def test_samples_do_not_depend_on_the_batch_size(toy_run, tmp_path):
  config, workdir = toy_run
  a = evaluate.sample(config, workdir, tmp_path / "a")
  config = config.copy_and_resolve_references()
  config.sampling.batch_size = 8
  b = evaluate.sample(config, workdir, tmp_path / "b")
  assert a["samples"].shape == (40, 2) and a["nfe"] == config.sampling.num_steps
  np.testing.assert_allclose(a["samples"], b["samples"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_likelihood_and_eval_loss_count_every_example_once(toy_run, tmp_path):
  config, workdir = toy_run
  config = config.copy_and_resolve_references()
  config.eval.likelihood_examples = 37                     # not a multiple of the batch of 16
  result = evaluate.likelihood(config, workdir, tmp_path)
  assert result["values"].shape == (37,) and result["unit"] == "nats"
  assert np.all(np.isfinite(result["values"]))
  values = result["values"].astype(np.float64)
  assert result["sem"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(37))
  # The value a perfect model reaches: the data's own density of the same (first 37 test) points.
  points = datasets.toy_source("8gaussians", "test").images[:37]
  exact = np.mean(np.asarray(datasets.toy_density("8gaussians").log_prob(points)))
  assert result["exact_mean"] == pytest.approx(exact, rel=1e-5)
  loss = evaluate.eval_loss(config, workdir)
  assert loss["num_examples"] == 10_000 and np.isfinite(loss["loss"])


@pytest.mark.slow
def test_digits_bits_per_dim_on_every_test_image(tmp_path):
  config = digits_unet_continuous.get_config()
  t = config.training
  t.n_iters, t.n_jitted_steps, t.batch_size = 1, 1, 8
  t.log_freq = t.eval_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = 1
  t.snapshot_sampling = False
  config.model.name, config.model.hidden_dims = "mlp", (32,)   # flattens images; compiles in seconds
  config.eval.batch_size, config.eval.rtol, config.eval.atol = 64, 1e-2, 1e-2
  config.eval.likelihood_examples = 0
  builders.validate(config)
  train.train(config, tmp_path)
  result = evaluate.likelihood(config, tmp_path, tmp_path / "eval")
  assert result["values"].shape == (297,) and result["unit"] == "bits/dim"   # 297 = 4 batches + 41
  assert np.all(np.isfinite(result["values"])) and 0.0 < result["mean"] < 50.0


def test_summary_counts_parameters_without_compiling(capsys):
  from main import summary  # pylint: disable=g-import-not-at-top
  config = vp_8gaussians.get_config()
  count = summary(config)
  assert f"parameters: {count}" in capsys.readouterr().out
  h = config.model.hidden_dims
  assert count > h[0] * h[1] + h[1] * h[2]


def test_summary_memory_report_and_largest_batch(capsys, monkeypatch):
  from main import summary  # pylint: disable=g-import-not-at-top
  from score_sde import memory  # pylint: disable=g-import-not-at-top

  def step_memory(config, mesh, per_device_batch=None, name="as configured"):  # no compilation: 1 MiB + 1 KiB / example
    per_device_batch = per_device_batch or config.training.batch_size
    if config.model.remat:
      return memory.StepMemory(name, per_device_batch, refused="config.model.remat=True: The mlp network has no remat")
    return memory.StepMemory(name, per_device_batch, arguments=2**20, temporaries=2**10 * per_device_batch)

  monkeypatch.setattr(memory, "step_memory", step_memory)
  summary(vp_8gaussians.get_config(), memory_gb=2 / 1024)
  out = capsys.readouterr().out
  assert "from XLA's buffer assignment on cpu" in out and "as configured" in out and "not available" in out
  assert "largest per-device batch within 0.00195312 GiB (as configured): 1024" in out


def test_import_an_original_checkpoint_then_use_it(tmp_path):
  from tests import test_paper_models as paper  # pylint: disable=g-import-not-at-top
  config, model, io, ckpt = paper.load_fixture("ddpm_vp_ch22")   # skips when the fixtures are absent
  source = paper.fixture_dir("ddpm_vp_ch22") / "weights.npz"
  result = convert.import_checkpoint(config, tmp_path, str(source))
  assert result["step"] == 0 and not result["has_ema"]
  # The workdir now reads like a trained run's: the EMA score function is the imported network's.
  restored = builders.restore(config, tmp_path)
  assert restored.step == 0
  for a, b in zip(jax.tree.leaves(restored.fn.variables["params"]), jax.tree.leaves(ckpt.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="already holds checkpoints"):
    convert.import_checkpoint(config, tmp_path, str(source))


