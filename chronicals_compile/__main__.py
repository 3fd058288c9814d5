"""``python -m chronicals_compile``: the ``chronicals`` command."""
import sys

from .cli import main

sys.exit(main())
