"""`premoe bench route`: see benchmark.py."""
