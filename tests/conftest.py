import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny networks on 2 shared cores: intra-op threading costs more than it saves (11 ms vs 0.05 ms for a 231x32
    linear when another process holds a core). Modules opt in with pytestmark = usefixtures("one_thread"), single
    tests by asking for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
