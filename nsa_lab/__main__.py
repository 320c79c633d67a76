"""``python -m nsa_lab`` is the ``nsa-lab`` command."""

import sys

from nsa_lab.cli import main

sys.exit(main())
