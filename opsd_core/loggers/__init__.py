"""The built-in loggers and the group that fans a run's records out to the configured ones.

- :mod:`opsd_core.loggers.jsonl`: ``metrics.jsonl`` and the media pages in the run directory (always on).
- :mod:`opsd_core.loggers.tensorboard_logger`: TensorBoard event files (``pip install tensorboard``).
- :mod:`opsd_core.loggers.wandb_logger`: Weights & Biases (``pip install wandb``; offline unless configured).
- :mod:`opsd_core.loggers.group`: building the configured loggers and closing them however the run ends.
"""
