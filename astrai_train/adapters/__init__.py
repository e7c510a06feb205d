"""Parameter-efficient fine-tuning: LoRA layers wrapped around the model's Linear layers from
outside (the model's code is unchanged), switched off for a reference forward, merged into the
weights for export, and saved/loaded in PEFT's adapter format.

    lora.py         LoRALinear (frozen base + low-rank update, `.weight` stays readable)
    apply.py        apply_lora / disable_adapters / merge_lora / remove_lora
    peft_format.py  adapter_config.json + adapter_model.safetensors, as PEFT writes them

Imports torch, safetensors and nothing of astrai but itself: the model knows nothing of
adapters, and objectives/ (training, export) use this package.
"""
from .apply import (DEFAULT_TARGETS, AdapterSpec, adapter_spec, apply_lora, disable_adapters,
                    has_lora, lora_layers, merge_lora, remove_lora)
from .lora import LoRALinear, LowRankWeight
from .peft_format import load_adapter, read_adapter, save_adapter

__all__ = ["AdapterSpec", "DEFAULT_TARGETS", "LoRALinear", "LowRankWeight", "adapter_spec",
           "apply_lora", "disable_adapters", "has_lora", "load_adapter", "lora_layers", "merge_lora",
           "read_adapter", "remove_lora", "save_adapter"]
