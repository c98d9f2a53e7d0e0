"""``python -m surgery``: the ``surgery`` command line."""

from .cli import main

raise SystemExit(main())
