import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids OpenMP oversubscription on a shared 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` or a directory conftest."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
