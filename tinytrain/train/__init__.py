"""One optimizer step and what surrounds it: the LightningModule, the step, optimizers and schedules,
EMA, the loss-spike guard, FSDP2 parallelism and its strategy, throughput and the console."""
