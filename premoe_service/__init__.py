"""PreMoe Service: serve Mixture-of-Experts models with only a task's experts resident."""

__version__ = "0.1.0"
