"""``python -m loralab`` is the ``loralab`` command (handy under torchrun: ``torchrun -m loralab train ...``)."""

import sys

from loralab.cli import main

sys.exit(main())
