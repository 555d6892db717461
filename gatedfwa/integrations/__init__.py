"""gatedfwa inside other libraries' models.

transformers_attention: attn_implementation="gatedfwa" for `transformers` models (registered
    when gatedfwa is imported); transformers_masks: their attention masks as the op takes them.
transformers_checkpoints: older GatedFWA parameter names renamed when from_pretrained loads.
peft_targets: PEFT's default target modules for model_type "gatedfwa" (registered when peft
    is imported).
"""
