"""LoRA (`alpaca train --lora-r R`): rank-R adapters on the attention and MLP projections, the base model frozen.

Levanter's own LoRA (levanter.adaptor.lora) does the tree surgery (`loraize`, with PEFT's initialisation: A random, B
zero), the trainable-parameter filter the trainer takes (`lora_trainable_params_filter`: the optimizer state and the
checkpoints hold the adapters only) and the merge.
Here: the family check (families.Family.lora), the run record, and the two exports:
- merged (the default): the adapters folded into the base weights, a plain Hugging Face checkpoint like a full run's;
- `--adapter`: a PEFT adapter (adapter_config.json, adapter_model.safetensors). With LoRA the embedding is frozen, so
  the [PAD] row prepare added is the mean of the others (Stanford's initialisation, never trained): load the base
  model, `resize_token_embeddings(len(tokenizer))` (transformers initialises new rows to the mean too), then
  `PeftModel.from_pretrained`. The adapter's model card says so.
"""

from __future__ import annotations

import json
import os

from alpaca_cli.core.families import FAMILIES
from alpaca_cli.errors import ConfigError
from alpaca_cli.records import LoraRecord

PEFT_PREFIX = "base_model.model"
"""Where PEFT keeps the wrapped model's modules in an adapter's state dict (keys base_model.model.model.layers...)."""


def record(cfg) -> LoraRecord | None:
    if not cfg.lora:
        return None
    return LoraRecord(r=cfg.lora_r, alpha=cfg.lora_scale_alpha, dropout=cfg.lora_dropout,
                      targets=list(cfg.lora_targets))


def check_family(model_type: str, spec: str) -> None:
    if not FAMILIES[model_type].lora:
        offered = [f.model_type for f in FAMILIES.values() if f.lora]
        raise ConfigError(f"--lora-r: LoRA is not available for {model_type} models (--model {spec}); "
                          f"it is for {', '.join(offered)}", hint="train every weight instead (no --lora-r)")


def levanter_config(lora: LoraRecord):
    from levanter.adaptor.lora import LoraConfig

    # the paper's and PEFT's initialisation (A random, B zero): training starts from the base model's own outputs
    return LoraConfig(target_modules=list(lora.targets), r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                      a_init_mode="random", zero_init_b=True)


def add_adapters(model, lora: LoraRecord, key):
    """The model with adapters on the target projections (B initialised to 0: the model computes what it did)."""
    import jax
    from levanter.adaptor.lora import LowRankLinear, loraize

    model = loraize(model, levanter_config(lora), key=key)
    found = [x for x in jax.tree_util.tree_leaves(model, is_leaf=lambda n: isinstance(n, LowRankLinear))
             if isinstance(x, LowRankLinear)]
    if not found:
        raise ConfigError(f"--lora-targets {','.join(lora.targets)}: no module of the model has these names",
                          hint="use the projection names of the family, e.g. q_proj,v_proj")
    return model


def trainable(model):
    from levanter.adaptor.lora import lora_trainable_params_filter

    return lora_trainable_params_filter(model)


def merge(model):
    """The adapters folded into their projections: a plain model of the family."""
    import haliax as hax
    from levanter.adaptor.lora import merge_lora_modules

    return hax.named_jit(merge_lora_modules)(model)


def adapters_only(model):
    """The tree of the adapters alone (everything else None): what the checkpoints hold of the model."""
    import equinox as eqx
    from levanter.adaptor.lora import is_lora_param

    return eqx.filter(model, trainable(model), is_leaf=is_lora_param)


def save_adapter(model, lora: LoraRecord, base_model: str, folder: str) -> None:
    """A PEFT adapter: adapter_config.json and adapter_model.safetensors (float32)."""
    import numpy as np
    from levanter.adaptor.lora import lora_state_dict, to_hf_config
    from safetensors.numpy import save_file

    state = {k: np.asarray(v, dtype=np.float32) for k, v in lora_state_dict(model, prefix=PEFT_PREFIX).items()}
    save_file(state, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = to_hf_config(levanter_config(lora), base_model_name_or_path=base_model)
    config.update(lora_dropout=lora.dropout, target_modules=list(lora.targets))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
