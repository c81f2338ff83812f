"""Training machinery shared by teacher training and distillation (entry point: ``pipeline.train``).

- ``runtime``: device, bf16/channels_last on CUDA, torchrun rank and DDP wrapping, seeds, RNG snapshots.
- ``loop``: the generic ``fit`` loop, batch samplers, SGD + cosine schedule, resumable train state.
- ``evaluate``: accuracy / cross-entropy / distance to a known posterior.
"""
