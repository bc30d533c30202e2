"""`premoe bench switch`: see benchmark.py."""
