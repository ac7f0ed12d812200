"""``python -m recon`` (and ``accelerate launch -m recon``) runs the CLI."""

import sys

from recon.cli import main

sys.exit(main())
