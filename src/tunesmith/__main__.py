"""``python -m tunesmith``: the command line (what ``torchrun -m tunesmith train CONFIG`` runs)."""
import sys

from .cli import main

sys.exit(main())
