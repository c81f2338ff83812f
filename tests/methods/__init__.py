"""Registry-parametrized tests of the distillation methods (``pipeline.methods``)."""
