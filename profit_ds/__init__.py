"""profit-ds: federated prompt tuning benchmark on a frozen, ZeRO-3-sharded LLM backbone."""

__version__ = "0.1.0"
