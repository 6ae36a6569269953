"""Batched on-policy sampling, written only against the Backend interface."""

from opsd_core.sampling.sampler import (
    BatchedSampler,
    choose_tokens,
    row_seeds,
    sample_seed,
    seeded_choice,
    uniform_noise,
)

__all__ = ["BatchedSampler", "choose_tokens", "row_seeds", "sample_seed", "seeded_choice", "uniform_noise"]
