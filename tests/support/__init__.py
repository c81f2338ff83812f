"""Code the tests share, imported by name (``from tests.support.stores import make_fake_store``).

- ``data``: tiny on-disk datasets in their real formats (IDX, CIFAR pickles, image folders);
- ``stores``: a deterministic fake teacher, fake stores, tiny synthetic teachers;
- ``distill``: untrained teachers of any architecture, their caches, a DDP worker for spawn.

Being modules of the ``tests`` package (not files found on ``sys.path`` by accident), they import
the same way in pytest, in processes started by ``torch.multiprocessing.spawn`` and in bench/.
"""
