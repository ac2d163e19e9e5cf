"""The benchmark harness behind ``kvcompress bench``: every method measured on the same footing.

One module per concern:

- :mod:`~kvcompress.bench.texts`: built-in texts (English prose, Python code) or a file.
- :mod:`~kvcompress.bench.methods`: a spec resolved into a row (its cache, its prefill hooks).
- :mod:`~kvcompress.bench.perplexity`: continuation perplexity after a compressed context.
- :mod:`~kvcompress.bench.retrieval`: facts planted at known depths, asked after the context.
- :mod:`~kvcompress.bench.speed`: prefill s, decode ms/token and peak memory, in a fresh process.
- :mod:`~kvcompress.bench.runner`: what to measure, what to reuse, in which folder.
- :mod:`~kvcompress.bench.report`: rows, ratios to ``none``, table, CSV and JSON.
- :mod:`~kvcompress.bench.plot`: the compression/quality frontier (optional matplotlib).
- :mod:`~kvcompress.bench.kvpress_adapter`: NVIDIA kvpress presses as rows (optional kvpress).
"""
