"""The pretraining loop and what surrounds it: schedule, checkpoints, pre-emption, metrics."""
