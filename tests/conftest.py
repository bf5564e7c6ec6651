import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
# pytest-xdist workers (pyproject addopts: one per core) run one torch thread each, so they do not
# oversubscribe the cores; a single process uses two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_model():
    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM

    torch.manual_seed(0)
    cfg = AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, vocab_size=50)
    return AttnOnlyForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Train with one thread (as the CLI subprocesses and the zoo's workers do), so byte comparisons
    between in-process and subprocess runs are like for like."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def dead_and_live_pid():
    """(pid of a process that has exited, pid of one still running): writers of leftover temporaries."""
    import subprocess

    done = subprocess.Popen(["true"])
    done.wait()
    live = subprocess.Popen(["sleep", "120"])
    yield done.pid, live.pid
    live.kill()
    live.wait()
