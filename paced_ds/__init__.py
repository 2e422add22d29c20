"""paced-ds: DeepSpeed distillation at the frontier of student competence (PACED)."""

__version__ = "0.2.0"
