"""GPU and CPU benchmarks that print tables; run from the repository root as
``python -m benchmarks.<name>`` (``bash benchmarks/gpu.sh SECTION...`` for a GPU call)."""
