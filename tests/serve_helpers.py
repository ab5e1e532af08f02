"""The server tests use the benchmark's helpers: random-weight adapters and `lora-tune serve` in a child."""

from lora_tune.bench.load import ServerProcess, random_adapter

__all__ = ["ServerProcess", "random_adapter"]
