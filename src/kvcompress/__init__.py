"""kvcompress: compress the KV cache of HuggingFace causal LMs, with exact memory accounting.

    import kvcompress
    model, tokenizer = kvcompress.load_model()
    cache = kvcompress.make_cache("streaming:window=1024+kivi:bits=4", model)
    with kvcompress.attach(model, cache):
        model.generate(**inputs, past_key_values=cache)
    print(cache.nbytes)
"""

from kvcompress import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from kvcompress.attach import attach
from kvcompress.cache import CompressedCache, load_cache, make_cache
from kvcompress.generation import ask, compress, generate
from kvcompress.models import load_model
from kvcompress.registry import SpecError, methods, register

__all__ = [
    "CompressedCache", "SpecError", "ask", "attach", "compress", "generate", "load_cache", "load_model", "make_cache", "methods",
    "register",
]
__version__ = "0.1.0"
