"""One process of a training run of the toy config, for the multi-process tests (tests/test_multihost.py).

    python tests/multihost_worker.py WORKDIR OUT.npz --num_processes 2 --process_id 0 --port 23456 \
        --overrides '{"training.n_iters": 8}' [--hang_after 6] [--sigterm_at 2]

With ``--num_processes`` > 1 it joins the others through ``parallel.initialize_distributed`` on
127.0.0.1. Process 0 writes the final train state's leaves to OUT.npz (``arr_<i>`` in
``jax.tree.leaves`` order), the training losses (``losses``), the step it resumed from
(``start``) and whether it was preempted. With ``--hang_after s`` the process waits, after the
checkpoint of step s is written, writes ``OUT.npz.hang<process_id>`` and sleeps: the caller kills it there.
With ``--sigterm_at c`` the last process sends itself SIGTERM during the c-th compiled call's
preemption check (the others get no signal).
"""

import argparse
import json
import os
import pathlib
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from score_sde import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("out")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--overrides", default="{}")
  parser.add_argument("--hang_after", type=int, default=0)
  parser.add_argument("--sigterm_at", type=int, default=0)
  args = parser.parse_args()
  if args.num_processes > 1:
    parallel.initialize_distributed(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                    process_id=args.process_id, initialization_timeout=60)

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from score_sde import checkpoints  # pylint: disable=g-import-not-at-top
  from score_sde import train  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tests.test_train import toy_config  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)  # progress lines on stderr, for a failing test's report

  assert jax.process_count() == args.num_processes, (jax.process_count(), args.num_processes)
  if args.hang_after:
    save = checkpoints.Checkpointer.save

    def save_then_hang(self, step, *a, **kw):
      saved = save(self, step, *a, **kw)
      if step == args.hang_after:
        self.wait()
        pathlib.Path(f"{args.out}.hang{args.process_id}").write_text(str(step))
        time.sleep(3600)
      return saved

    checkpoints.Checkpointer.save = save_then_hang
  if args.sigterm_at and args.process_id == args.num_processes - 1:
    reached, calls = parallel.PreemptionNotice.reached, [0]

    def reached_after_sigterm(self):
      calls[0] += 1
      if calls[0] == args.sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return reached(self)

    parallel.PreemptionNotice.reached = reached_after_sigterm
  start = checkpoints.list_steps(args.workdir)
  result = train.train(toy_config(**json.loads(args.overrides)), args.workdir)
  if jax.process_index() == 0:
    leaves = [np.asarray(x) for x in jax.tree.leaves(result.state)]
    np.savez(args.out, *leaves, losses=np.array([v for _, v in result.history["training_loss"]]),
             start=max(start, default=0), preempted=result.preempted, step=result.step,
             devices=jax.device_count())
  print("OK", jax.process_index(), result.step, flush=True)


if __name__ == "__main__":
  main()
