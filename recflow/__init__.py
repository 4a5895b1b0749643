"""recflow: orchestrated MLOps workflow for personalised e-commerce recommendation."""

__version__ = "0.1.0"
