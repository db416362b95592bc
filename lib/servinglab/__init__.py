"""servinglab: deploy LLM serving layers, measure them, and report the comparison."""

__version__ = "0.1.0"
