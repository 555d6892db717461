"""Test session setup.

Tests run on the CPU by default, Triton kernels through its interpreter, which must be
switched on before triton is imported. GATEDFWA_TEST_DEVICE=cuda runs the same tests on a GPU.
"""

import os

if os.environ.get("GATEDFWA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = os.environ.get("GATEDFWA_TEST_DEVICE", "cpu")

# With pytest -n (pytest-xdist), the workers share the cores: each takes its share of threads
# (torch's default is every core per process, which oversubscribes the machine).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Different inputs for every test (and parameter set), reproducible from its id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_addoption(parser):
    parser.addoption(
        "--first-case-only", action="store_true",
        help="run only the first parameter set of every test function: each test once, for a pass "
             "that checks compatibility (e.g. the newest Triton in .ci/run) rather than every case")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--first-case-only"):
        return
    seen, kept, dropped = set(), [], []
    for item in items:
        key = (item.nodeid.split("::")[0], getattr(item, "originalname", item.name))
        (dropped if key in seen else kept).append(item)
        seen.add(key)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
