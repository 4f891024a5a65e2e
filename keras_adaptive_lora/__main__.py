"""`python -m keras_adaptive_lora`: the command line (`keras-adaptive-lora`)."""

import sys

from keras_adaptive_lora.cli import main

if __name__ == "__main__":
    sys.exit(main())
