"""Storage codecs: one class per storage kind (the attrs ``storage.kind``, ``--storage``), looked up by name.

    from pipeline.store.codecs import CODECS, make_codec
    CODECS.names()                                   # ['dense', 'sampled', 'topk']
    codec = make_codec("dense", num_classes=10, dtype="int8")

    dense.py    logits in float16/float32, or int8 with a per-row scale and offset
    topk.py     the k largest logits, their classes, the exact logsumexp
    sampled.py  classes and counts of k draws from the teacher's softmax at the store's temperature
    base.py     the ``Codec`` base class, the registry, the helpers every codec shares

Adding a codec: a module with a ``Codec`` subclass under ``@register("name")`` (base.py says
what it implements), and its import line below. Every codec's bytes depend only on the block's
float32 logits (and the store's seed, view and block), never on the thread count.
"""

# Registration: one line per codec module; a new codec module adds its line here.
from pipeline.store.codecs import dense  # noqa: F401
from pipeline.store.codecs import sampled  # noqa: F401
from pipeline.store.codecs import topk  # noqa: F401
from pipeline.store.codecs.base import (CODECS, DEFAULT_KIND, Codec, check_storage, codec_class, dtypes, kinds_taking,
                                        make_codec, register)

__all__ = ["CODECS", "DEFAULT_KIND", "Codec", "check_storage", "codec_class", "dtypes", "kinds_taking", "make_codec",
           "register"]
