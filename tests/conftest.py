import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def builtin_pipe():
    from duge.models import load_pipeline

    return load_pipeline("builtin")


@pytest.fixture(scope="session")
def evaluator():
    from duge.world.callbacks import builtin_evaluator

    return builtin_evaluator()
