"""``python -m kiln_trainer_ultralytics``: train the job described by the ``KILN_*`` environment."""

import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main())
