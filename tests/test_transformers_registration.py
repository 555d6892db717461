"""`import gatedfwa` makes transformers know model_type "gatedfwa", attn_implementation="gatedfwa"
and the renamings of older checkpoint keys, and PEFT its default target modules for
"gatedfwa", whichever is imported first, without importing torch itself
(gatedfwa/transformers_registration.py)."""

import subprocess
import sys

import pytest

CHECK_REGISTERED = """
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
assert "gatedfwa" in AttentionInterface._global_mapping, "attention implementation missing"
config = AutoConfig.for_model("gatedfwa", vocab_size=32, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, window_size=4)
model = AutoModelForCausalLM.from_config(config)
assert type(model).__name__ == "GatedFWAForCausalLM", type(model)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
assert get_checkpoint_conversion_mapping("gatedfwa"), "checkpoint key renamings missing"
print("registered")
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import gatedfwa, sys\nassert 'torch' not in sys.modules\nimport transformers\n",
        "import transformers\nimport gatedfwa\n",
        "import gatedfwa\nfrom transformers import AutoConfig\n",
    ],
    ids=["gatedfwa-first", "transformers-first", "from-import"],
)
def test_registered_in_either_import_order(imports):
    result = subprocess.run([sys.executable, "-c", imports + CHECK_REGISTERED], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "registered" in result.stdout


def test_lazy_exports():
    import gatedfwa

    assert callable(gatedfwa.gated_window_attention)
    assert "nsa_attention" in dir(gatedfwa)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        gatedfwa.not_a_name


def test_peft_learns_the_default_targets_when_imported_after_gatedfwa():
    code = (
        "import gatedfwa, sys\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules\n"
        "from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets\n"
        "assert targets['gatedfwa'] == ['q_proj', 'v_proj'], targets.get('gatedfwa')\n"
        "print('registered')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "registered" in result.stdout
