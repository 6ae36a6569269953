"""The OPSD training loop, checkpoints and the step-loss reduction."""
