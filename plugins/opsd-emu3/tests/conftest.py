"""Shared test setup: one torch thread while this plugin's tests run.

The debug model's matrices are tiny, so a second intra-op thread buys nothing and, on shared
CPU cores, oversubscription makes these tests several times slower. The setting is restored
afterwards so other suites keep theirs.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
