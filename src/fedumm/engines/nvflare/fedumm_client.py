"""FLARE Client API entry script shipped in the job's custom/ folder (the logic lives in the installed
package: :mod:`fedumm.engines.nvflare.client`, or :mod:`fedumm.engines.nvflare.relay` where the
environment names a shared trainer)."""

import os
import sys

from fedumm.engines.nvflare.names import ENV_TRAINER_ADDRESS

if __name__ == "__main__":
    if os.environ.get(ENV_TRAINER_ADDRESS):  # this site relays to the machine's shared trainer
        from fedumm.engines.nvflare.relay import main as relay_main

        relay_main(sys.argv[1:])
    else:
        from fedumm.engines.nvflare.client import main

        main(sys.argv[1:], script_dir=os.path.dirname(os.path.abspath(__file__)))
