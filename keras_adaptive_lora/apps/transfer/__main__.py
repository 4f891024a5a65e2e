"""`python -m keras_adaptive_lora.apps.transfer`: the transfer job's command line."""

import sys

from keras_adaptive_lora.apps.transfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
