"""python -m denoise_fault RANK IMAGE DENOISE-ARGS... (tests/ on the path): cryokern.denoise,
where rank RANK is SIGKILLed (as the OOM killer would) as it starts its image number IMAGE
(counted from 0 in its share). For test_denoise_ranks.py, as ranks started by
distributed.launch."""
import os
import signal
import sys

from cryokern import denoise, distributed
from cryokern.inference import TiledDenoiser


def main():
    rank, image = int(sys.argv[1]), int(sys.argv[2])
    original, done = TiledDenoiser.__call__, []

    def call(self, *args, **kwargs):
        if int(os.environ["CRYOKERN_RANK"]) == rank and len(done) == image:
            os.kill(os.getpid(), signal.SIGKILL)
        done.append(1)
        return original(self, *args, **kwargs)
    TiledDenoiser.__call__ = call
    return denoise.main(sys.argv[3:])


if __name__ == "__main__":
    assert distributed.launched_size() > 1, "run as ranks (distributed.launch)"
    sys.exit(main())
