"""Training loops, pretraining and the demo pipeline."""

from xbm.train.loop import (
    BatchSource,
    TrainResult,
    evaluate,
    evaluate_task,
    resolve_cuda_graph,
    resolve_device,
    seed_everything,
    train_task,
)

__all__ = ["BatchSource", "TrainResult", "evaluate", "evaluate_task", "resolve_cuda_graph",
           "resolve_device", "seed_everything", "train_task"]
