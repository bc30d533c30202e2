"""`python -m premoe_service.bench.switch`: the benchmark's own flags, then its run and report."""

from .benchmark import main

raise SystemExit(main())
