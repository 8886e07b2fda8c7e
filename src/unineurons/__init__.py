"""unineurons: find and study universal neurons across seeds of language models."""

__version__ = "0.1.0"
