"""python -m rank_fault RANK STEP ACTION TRAIN-ARGS... (tests/ on the path): cryokern.train,
where rank RANK, before step STEP + 1, is killed (ACTION 'kill', SIGKILL: as the OOM killer
would) or raises (ACTION 'raise'). For the fault tests of test_distributed.py, as ranks started
by mpiexec or distributed.launch."""
import os
import signal
import sys

from cryokern import distributed, train
from cryokern.step import TrainStep


def main():
    rank, step, action = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    original = TrainStep.launch

    def launch(self, x, target, images=None):
        if self.step == step and self.comm.rank == rank:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault before step {step + 1}")
        return original(self, x, target, images)
    TrainStep.launch = launch
    return train.main(sys.argv[4:])


if __name__ == "__main__":
    assert distributed.launched_size() > 1, "run as ranks (mpiexec, distributed.launch)"
    sys.exit(main())
