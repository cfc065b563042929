"""A run's life around the steps: publishing checkpoints (synchronous or in the background), the run
lock, and preemption signals."""
