"""`premoe bench ray`: see benchmark.py."""
