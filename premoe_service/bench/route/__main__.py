"""`python -m premoe_service.bench.route`: the routing benchmark's own flags, then its run and report."""

import argparse

from .benchmark import __doc__ as description
from .benchmark import main

parser = argparse.ArgumentParser(prog="python -m premoe_service.bench.route", description=description)
parser.add_argument("--quick", action="store_true", help="1, 100 and 1,000 tasks, fewer repeats (~1 min)")
parser.add_argument("--repeats", type=int, default=None, help="passes over the 42 queries per size")
parser.add_argument("--index-sweep", action="store_true", help="also time exact vs HNSW search from 2k to 40k vectors")
args = parser.parse_args()
main(args.quick, args.repeats, args.index_sweep)
