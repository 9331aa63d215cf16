"""What many test files share: the three SDEs, compiling small test programs quickly, and running main.py's entry
point for many command lines in one process."""

import json
import os
import subprocess
import sys

import jax

from score_sde import sde as sde_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# XLA's expensive optimisation passes off: test programs are small, so compiling dominates their time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # XLA_FLAGS form


def sdes(ve_sigma_max: float = 10.0, **kwargs) -> dict[str, sde_lib.SDE]:
  """{"vp", "subvp", "ve"}: VP and sub-VP with the paper's betas, VE from sigma_min = 0.01 to ``ve_sigma_max``."""
  return {"vp": sde_lib.VPSDE(**kwargs), "subvp": sde_lib.SubVPSDE(**kwargs),
          "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=ve_sigma_max, **kwargs)}


SDES = sdes()


def fast_jit(fn, **kwargs):
  """``jax.jit`` with ``FAST_COMPILE``."""
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)



# main.py's entry point once per command line, in one process; prints {name: {"code", "stderr"}} as JSON.
_DRIVER = """
import contextlib, io, json, sys, traceback
import main
from absl import flags
commands, stop_on_failure = json.loads(sys.argv[1]), sys.argv[2] == "stop"
out = {}
for name, argv in commands.items():
  flags.FLAGS.unparse_flags()
  for flag in [n for n in flags.FLAGS if n.startswith("config.")]:  # a config's own override flags
    delattr(flags.FLAGS, flag)
  sys.argv, err, code = ["main.py"] + argv, io.StringIO(), 0
  with contextlib.redirect_stderr(err):
    try:
      main.entry_point()
    except SystemExit as e:
      code = e.code or 0
    except BaseException:  # an error that escaped the entry point: its traceback is the failure
      err.write("Traceback (escaped the entry point)\\n" + traceback.format_exc())
      code = "escaped"
  out[name] = {"code": code, "stderr": err.getvalue()}
  if code and stop_on_failure:
    break
print(json.dumps(out))
"""


def run_entry_point(commands: dict[str, list[str]], cwd, env: dict[str, str] | None = None,
                    stop_on_failure: bool = False, timeout: float = 300) -> dict[str, dict]:
  """Runs ``main.entry_point()`` for each ``{name: argv}`` in one fresh process (JAX imported and programs
  compiled once), absl's flags reset between them: ``{name: {"code": exit status (0 when it returns,
  "escaped" for an uncaught error), "stderr": its stderr}}``; with ``stop_on_failure`` the first failure ends it."""
  env = dict(os.environ if env is None else env)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(commands), "stop" if stop_on_failure else "all"],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])

