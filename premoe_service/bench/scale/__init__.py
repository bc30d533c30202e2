"""`premoe bench scale`: see benchmark.py."""
