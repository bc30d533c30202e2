"""`premoe bench serve`: see benchmark.py."""
