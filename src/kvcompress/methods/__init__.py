"""Built-in compression methods, one file and one dataclass each; importing this package registers them."""

from kvcompress.methods import adakv, h2o, kivi, knorm, pyramidkv, snapkv, streaming, tova  # noqa: F401
from kvcompress.methods import lowrank, share_heads, share_layers  # noqa: F401
