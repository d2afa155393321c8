"""owlore-ds: memory-efficient full-parameter fine-tuning of LLMs on DeepSpeed."""

__version__ = "0.1.0"
