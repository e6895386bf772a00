"""``python -m abc_experiments.report DIR`` (the same as ``abc-report DIR``)."""

from .cli import main

raise SystemExit(main())
