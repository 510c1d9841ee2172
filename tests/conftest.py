import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Prepared datasets go to a per-session cache, never the user's (also for module-scoped fixtures)."""
    before = os.environ.get("LLMTRAIN_CACHE")
    os.environ["LLMTRAIN_CACHE"] = str(tmp_path_factory.getbasetemp() / "llmtrain-cache")
    yield
    if before is None:
        os.environ.pop("LLMTRAIN_CACHE", None)
    else:
        os.environ["LLMTRAIN_CACHE"] = before


@pytest.fixture
def one_thread():
    """Tiny matmuls and convolutions run faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_rendezvous():
    """A test that leaves RANK/WORLD_SIZE/MASTER_* behind would make every later in-process run wait for
    peers that never come; fail that test instead."""
    before = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    leaked = {k: os.environ.get(k) for k in _RENDEZVOUS if os.environ.get(k) != before[k]}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert not leaked, f"the test left rendezvous variables in os.environ: {leaked}"
