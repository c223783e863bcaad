"""``python tests/kill_worker.py STEP ARGS...``: ``python -m emcjax.lowres ARGS`` that kills itself with SIGKILL
while Orbax writes checkpoint STEP (right after the write has started, before it is committed).

Used by tests/test_rundir.py to kill a run during a checkpoint write at a known moment; the other kill
moments of that test come from outside (SIGKILL at a random time).
"""

import os
import signal
import sys

from emcjax import checkpoint, lowres


def main() -> None:
    kill_step = int(sys.argv[1])
    real_save = checkpoint.save

    def save_then_die(manager, state, meta):
        real_save(manager, state, meta)  # asynchronous: returns while the step is still being written
        if int(state.iteration) == kill_step:
            print(f"kill_worker: SIGKILL while writing checkpoint {kill_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save = save_then_die
    lowres.main(sys.argv[2:])


if __name__ == "__main__":
    main()
