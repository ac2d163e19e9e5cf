"""Built-in compression methods; importing this package registers them."""

from kvcompress.methods import kivi, streaming  # noqa: F401
