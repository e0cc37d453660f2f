"""``python -m conversion``: see conversion/cli.py."""

from .cli import main

raise SystemExit(main())
