"""Distillation methods: pure loss functions per family and the METHODS registry.

    from pipeline.methods import METHODS, create_method
    METHODS.names()        # ['adaptive-alpha', 'alpha-guided', 'aver', 'ca-wkd', 'classroom', ...]

Each family module registers its methods when imported here (explicit imports, no discovery).
The public loss functions are re-exported by ``pipeline.losses``. ``teacher_losses.py`` holds the
teacher-training losses (ce, mse), which are no distillation methods.
"""

# Registration: one line per family module; a new family module adds its line here.
from pipeline.methods import classroom  # noqa: F401
from pipeline.methods import kd  # noqa: F401
from pipeline.methods import multi_teacher  # noqa: F401
from pipeline.methods import peers  # noqa: F401
from pipeline.methods.base import METHODS, Method, create_method

__all__ = ["METHODS", "Method", "create_method"]
