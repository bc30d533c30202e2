"""`python -m premoe_service.bench.scale`: the benchmark's own flags, then its run and report."""

from .benchmark import main

raise SystemExit(main())
