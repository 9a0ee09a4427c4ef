"""python -m training --data FILE --out MODEL_DIR (see training.cli)."""

import sys

from training.cli import main

sys.exit(main())
