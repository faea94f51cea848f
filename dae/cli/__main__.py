"""Entry point of ``python -m dae.cli``."""

from __future__ import annotations

from dae.cli import main

raise SystemExit(main())
