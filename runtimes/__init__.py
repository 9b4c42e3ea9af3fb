"""Runtime back-ends and the latency profiler. Nothing here imports torch."""
