"""jaxinfer: LLM inference on JAX/XLA with parallelism declared in sharding rules tables."""

__version__ = "0.1.0"
