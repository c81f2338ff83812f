"""kdcache: offline teacher-logit caching and knowledge distillation.

Teachers run once and write their logits, entropy and ground-truth probability to Zarr
stores (``pipeline.store``); students train from those cached targets
(``pipeline.methods``, ``pipeline.train``). The command line is ``kdcache --help``.
"""

__version__ = "0.1.0"
