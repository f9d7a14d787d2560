"""Draftsmith: speculative-decoding LLM serving that distills its drafters online from its own traffic.

The core library: model loading, drafters, the speculative engine, losses, traffic log, registry
client, metrics and CLI. It never imports Ray; serve/, jobs/ and pipelines/ are the Ray-facing layers.
"""

__version__ = "0.1.0"
