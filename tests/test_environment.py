"""gatedfwa/environment.py is the one reader of environment variables: every read in the
package goes through it, each variable is listed there with its meaning and default, and
each reader gives the default when the variable is unset and a ConfigError naming the
variable for a value that cannot be meant."""

import ast
import os
from pathlib import Path

import pytest

import gatedfwa
from gatedfwa import environment
from gatedfwa.errors import ConfigError

PACKAGE = Path(gatedfwa.__file__).resolve().parent
ENVIRONMENT_ACCESS = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}

# Reads allowed outside gatedfwa/environment.py, as (file, the line as written): none today.
# An entry whose line is gone fails below, so the list cannot go stale.
PENDING: set = set()


def _environment_accesses(path: Path) -> list[str]:
    """The source lines of ``path`` that touch the process environment: ``os.environ``,
    ``os.getenv`` and the like, or such a name imported from os."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT_ACCESS:
            found.add(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(alias.name in ENVIRONMENT_ACCESS for alias in node.names):
            found.add(node.lineno)
    return [lines[number - 1].strip() for number in sorted(found)]


def test_every_environment_read_goes_through_the_environment_module():
    reads = {(str(path.relative_to(PACKAGE)), line)
             for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "environment.py"
             for line in _environment_accesses(path)}
    assert reads - PENDING == set(), "read these through gatedfwa/environment.py (add the variable there)"
    assert PENDING - reads == set(), "these reads are gone: remove them from PENDING"


def test_the_check_finds_a_read(tmp_path):
    """The scan above sees each form of access (else it would pass on anything)."""
    module = tmp_path / "module.py"
    module.write_text("import os\nfrom os import getenv\nA = os.environ.get('X')\nB = os.environ['Y']\n")
    assert _environment_accesses(module) == ["from os import getenv", "A = os.environ.get('X')",
                                             "B = os.environ['Y']"]


def test_every_variable_is_listed_and_documented():
    defined = [value for value in vars(environment).values() if isinstance(value, environment.Variable)]
    assert set(defined) == set(environment.VARIABLES)
    names = [variable.name for variable in environment.VARIABLES]
    assert len(set(names)) == len(names)
    for variable in environment.VARIABLES:
        assert variable.meaning, variable.name
        assert f"\n    {variable.name} " in environment.__doc__, f"{variable.name} is missing from the module's table"


@pytest.fixture
def clean(monkeypatch):
    """No variable of the list set; each restored afterwards, also where the code under test
    sets it (setenv first, so that monkeypatch records the value to restore, unset included)."""
    for variable in environment.VARIABLES:
        monkeypatch.setenv(variable.name, "")
        monkeypatch.delenv(variable.name)
    return monkeypatch


def test_unset_variables_give_their_defaults(clean):
    assert environment.forced_backend() is None
    assert environment.check_values_on_device() is False
    assert environment.hopper_kernels() == "triton"
    assert environment.triton_interpret() is False
    assert (environment.rank(), environment.world_size(), environment.local_rank(),
            environment.local_world_size()) == (0, 1, 0, 1)
    assert environment.omp_num_threads_is_set() is False
    environment.check_environment()


def test_set_variables_are_read(clean):
    clean.setenv("GATEDFWA_BACKEND", " Torch ")
    clean.setenv("GATEDFWA_CHECK_VALUES", "1")
    clean.setenv("GATEDFWA_HOPPER_KERNELS", " Gluon ")
    clean.setenv("TRITON_INTERPRET", "1")
    clean.setenv("RANK", "5")
    clean.setenv("WORLD_SIZE", "8")
    clean.setenv("LOCAL_WORLD_SIZE", "4")
    clean.setenv("OMP_NUM_THREADS", "3")
    assert environment.forced_backend() == "torch"
    assert environment.check_values_on_device() and environment.triton_interpret()
    assert environment.hopper_kernels() == "gluon"
    assert (environment.rank(), environment.world_size(), environment.local_world_size()) == (5, 8, 4)
    assert environment.local_rank() == 5  # unset: RANK's value
    clean.setenv("LOCAL_RANK", "1")
    assert environment.local_rank() == 1
    assert environment.omp_num_threads_is_set()
    clean.setenv("GATEDFWA_BACKEND", "auto")
    assert environment.forced_backend() is None


@pytest.mark.parametrize("name, value, message", [
    ("GATEDFWA_BACKEND", "cuda", "GATEDFWA_BACKEND='cuda' is not a backend; accepted values: auto, triton, torch"),
    ("GATEDFWA_HOPPER_KERNELS", "cuda",
     "GATEDFWA_HOPPER_KERNELS='cuda' is not a kernel family; accepted values: triton, gluon"),
    ("RANK", "first", "RANK='first' must be a whole number >= 0: this process's index"),
    ("WORLD_SIZE", "0", "WORLD_SIZE='0' must be a whole number >= 1"),
    ("LOCAL_RANK", "-1", "LOCAL_RANK='-1' must be a whole number >= 0"),
    ("LOCAL_WORLD_SIZE", "", "LOCAL_WORLD_SIZE='' must be a whole number >= 1"),
])
def test_a_bad_value_names_the_variable(clean, name, value, message):
    clean.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        environment.check_environment()
    assert message in str(error.value)


def test_dataset_downloads_are_forbidden_unless_the_user_chose(clean):
    environment.forbid_dataset_downloads()
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    clean.setenv("HF_DATASETS_OFFLINE", "0")
    environment.forbid_dataset_downloads()
    assert os.environ["HF_DATASETS_OFFLINE"] == "0"
