"""Hypothesis profiles for the property suite: ``dev`` locally, ``ci`` when ``CI`` is set.

Neither has a deadline: CPU timings on shared machines are too noisy for one. ``ci`` runs
fewer examples, derandomized, so that a CI failure reproduces from the log alone.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", deadline=None, max_examples=100)
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=40,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
