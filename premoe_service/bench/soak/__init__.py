"""`premoe bench soak`: see benchmark.py."""
