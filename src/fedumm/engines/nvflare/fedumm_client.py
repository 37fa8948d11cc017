"""FLARE Client API entry script shipped in the job's custom/ folder (the logic lives in the installed
package: :mod:`fedumm.engines.nvflare.client`)."""

import os
import sys

from fedumm.engines.nvflare.client import main

if __name__ == "__main__":
    main(sys.argv[1:], script_dir=os.path.dirname(os.path.abspath(__file__)))
