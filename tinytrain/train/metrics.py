"""The names of the metrics a run logs: one home for the writers (the module, the throughput monitor,
in-loop evaluation) and the readers (the console, plots). Downstream task scores are logged as
``eval/<task>/<metric>`` (tinytrain.eval.loop)."""

TRAIN_LOSS = "train/loss"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"
TOKENS = "train/tokens"
TOKENS_PER_SEC = "train/tokens_per_sec"
TOKENS_PER_SEC_PER_DEVICE = "train/tokens_per_sec_per_device"
TFLOPS_PER_DEVICE = "train/tflops_per_device"
MFU = "train/mfu"
WALL_SECONDS = "train/wall_seconds"  # since this process began training (validation included; 0 again at a resume)
PEAK_MEMORY_GIB = "train/peak_memory_gib"
SPIKE_LOSS = "train/spike_loss"
SPIKE_GRAD_NORM = "train/spike_grad_norm"
SPIKES_SKIPPED = "train/spikes_skipped"
MOE = "moe"  # moe/aux_loss, moe/layer_<n>/imbalance, moe/layer_<n>/entropy (tinytrain.model.moe.figures)
VAL_LOSS = "val/loss"
VAL_PPL = "val/ppl"
VAL_BPB = "val/bpb"
EVAL_SECONDS = "eval/seconds"
EVAL_TINYLLAMA_AVERAGE = "eval/tinyllama/average"
LOCAL_SGD_OUTER_STEPS = "local_sgd/outer_steps"  # rounds ended between islands (tinytrain.train.local_sgd)
LOCAL_SGD_INNER_STEPS = "local_sgd/inner_steps"  # each island's steps per round (H)
LOCAL_SGD_EXCHANGED_BYTES = "local_sgd/exchanged_bytes"  # pseudo-gradient bytes each island all-reduced so far
LOCAL_SGD_STALENESS = "local_sgd/staleness"  # async: global updates between an island's fetch and its push
