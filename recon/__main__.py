"""``python -m recon`` (and ``accelerate launch -m recon``) runs the CLI."""

import sys

try:  # a Ctrl-C while the CLI module loads is one line too, as inside main()
    from recon.cli import main
except KeyboardInterrupt:
    print("recon: interrupted; rerun the same command to resume", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
