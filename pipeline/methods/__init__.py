"""Distillation methods: pure loss functions per family and the METHODS registry.

    from pipeline.methods import METHODS, create_method
    METHODS.names()        # ['adaptive-alpha', 'aver', 'ca-wkd', 'classroom', ...]

Each family module registers its methods when imported here (explicit imports, no discovery).
The public loss functions are re-exported by ``pipeline.losses``.
"""

from pipeline.methods import classroom, kd, multi_teacher, peers  # noqa: F401  (registration)
from pipeline.methods.base import METHODS, Method, create_method

__all__ = ["METHODS", "Method", "create_method"]
