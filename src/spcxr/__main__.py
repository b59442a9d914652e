"""``python -m spcxr`` (also what ``torchrun -m spcxr pretrain ...`` runs)."""

import sys

from spcxr.cli import main

sys.exit(main())
