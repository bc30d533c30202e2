"""Reference Mixture-of-Experts model for premoe_service: corpus, task data, training and metrics.

Everything here is built from text found offline on a stock Debian/Python machine plus generated
data; see reference/README.md.
"""
