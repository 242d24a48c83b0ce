"""Hand-made PEFT adapter directories for the gate and cache tests (no training: shapes and configs only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# The tiny model's layer sizes (loraplane.local.tinymodel.RECIPE): hidden 128, 4 heads, 2 KV heads -> k/v out 64.
HIDDEN, KV_OUT, LAYERS = 128, 64, 2


def write_adapter(directory: Path, *, r: int = 8, targets=("q_proj", "v_proj"), base: str = "loraplane/tiny-llama",
                  hidden: int = HIDDEN, zero_b: bool = False, extra_config: dict | None = None,
                  extra_tensors: dict | None = None, dtype=np.float32, seed: int = 0,
                  scale: float = 1.0) -> Path:
    """A LoRA adapter for a Llama-like model with `hidden` size, in PEFT's on-disk layout."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(LAYERS):
        for t in targets:
            out = hidden if t in ("q_proj", "o_proj") else hidden // 2
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{prefix}.lora_A.weight"] = (scale * rng.standard_normal((r, hidden))).astype(dtype)
            b = np.zeros((out, r)) if zero_b else scale * rng.standard_normal((out, r))
            tensors[f"{prefix}.lora_B.weight"] = b.astype(dtype)
    tensors.update(extra_tensors or {})
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets),
              "base_model_name_or_path": base, "bias": "none", "task_type": "CAUSAL_LM", "modules_to_save": None}
    config.update(extra_config or {})
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory
