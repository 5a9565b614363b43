"""`alpaca export --verify`: the export loaded by transformers (torch; with PEFT for an adapter) computes the logits
Levanter computes on prepared examples, and its greedy answers end with EOS."""

from __future__ import annotations

from alpaca_cli.config import ExportConfig
from alpaca_cli.core.logits import for_inference, model_logits
from alpaca_cli.core.mesh import COMPUTE
from alpaca_cli.errors import ConfigError
from alpaca_cli.records import ExportSummary
from alpaca_cli.rundir import RunDir

EOS_CHECK_TOKENS = 256
"""How many tokens a greedy answer gets to reach EOS."""


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--verify needs torch to load the export with transformers", hint="pip install 'alpaca-cli[torch]'"
        ) from None


def tolerance(cfg: ExportConfig, dtype_name: str) -> float:
    """--verify-tolerance, else what the export's rounding allows: 1e-4 in float32, 5e-2 in 16 bits."""
    if cfg.verify_tolerance is not None:
        return cfg.verify_tolerance
    return 1e-4 if dtype_name == "float32" else 5e-2


def load_model(folder: str, dtype_name: str):
    """The exported model as transformers loads it, computed in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    # eager: transformers' reference attention (its SDPA path skips Gemma-2's attention soft-capping)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name), attn_implementation="eager")
    return hf.float().eval()  # compare in float32: the export's rounding, not torch's bf16 kernels, is what we test


def load_adapter(folder: str, base_spec: str, tok):
    """transformers' base model, its embeddings resized to the prepared tokenizer, with PEFT's adapter loaded."""
    try:
        import peft
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConfigError("--verify with --adapter needs torch and peft", hint="pip install torch peft") from None
    from alpaca_cli.core.models import open_base_model

    with open_base_model(base_spec) as base:
        hf = AutoModelForCausalLM.from_pretrained(base.ref, dtype=torch.float32, attn_implementation="eager")
    old = hf.get_input_embeddings().weight.shape[0]
    hf.resize_token_embeddings(len(tok))
    with torch.no_grad():  # new rows: exactly the mean of the others, as training initialised [PAD] (and Stanford)
        for w in {id(x): x for x in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)}.values():
            w[old:] = w[:old].mean(0)
    return peft.PeftModel.from_pretrained(hf, folder).eval()


def compare(summary: ExportSummary, hf, lev_model, run: RunDir, tok, dtype_name: str, cfg: ExportConfig) -> None:
    """transformers' (torch) logits against Levanter's on the first prepared examples, and the EOS-stop rate: the
    summary's verify_* fields."""
    import equinox as eqx
    import haliax as hax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from levanter.layers.attention import AttentionMask

    from alpaca_cli.core import cache as cachemod

    prepared = cachemod.open_run_cache(run)
    n = min(cfg.verify_examples, len(prepared))
    rows = prepared.rows(range(n))

    # Levanter side: the trained model rounded to the export dtype, computed in float32 at full precision
    # (only floating arrays: models carry other leaves too, e.g. GPT-2's static flags), dropout off as transformers'
    lev = for_inference(jax.tree_util.tree_map(
        lambda x: x.astype(dtype_name).astype(jnp.float32) if eqx.is_inexact_array(x) else x, lev_model
    ))

    @hax.named_jit
    def logits_fn(model, ids):
        return model_logits(model, ids, AttentionMask.causal())

    max_diff = 0.0
    t_loss = l_loss = 0.0
    count = 0
    with jax.default_matmul_precision("float32"), hax.axis_mapping(COMPUTE):
        for row in rows:
            ids = row["input_ids"]
            Pos = lev.Pos.resize(len(ids))
            lev_ids = hax.named(jnp.asarray(ids, dtype=jnp.int32), Pos)
            lev_logits = np.asarray(logits_fn(lev, lev_ids).array, dtype=np.float64)
            with torch.no_grad():
                hf_logits = hf(input_ids=torch.tensor([ids.tolist()])).logits[0].double().numpy()
            max_diff = max(max_diff, float(np.abs(lev_logits - hf_logits).max()))
            targets = row["targets"].astype(bool)[1:]
            t_loss += _nll(hf_logits, ids, targets)
            l_loss += _nll(lev_logits, ids, targets)
            count += int(targets.sum())
    eos_rate, stopped = _eos_stop_rate(lev, tok, rows, EOS_CHECK_TOKENS)
    summary.verify_max_abs_diff, summary.verify_tolerance = max_diff, tolerance(cfg, dtype_name)
    summary.verify_examples, summary.verify_tokens = n, count
    summary.verify_loss, summary.verify_levanter_loss = t_loss / max(count, 1), l_loss / max(count, 1)
    summary.verify_eos_stop_rate, summary.verify_eos_stopped = eos_rate, stopped
    summary.verify_eos_max_new_tokens = EOS_CHECK_TOKENS


def _eos_stop_rate(model, tok, rows, max_new_tokens: int) -> tuple[float | None, int]:
    """Greedy answers to the examples' prompts (the tokens before their first trained one): how many end with EOS
    or the chat template's end-of-turn token (tok carries the template the export ships). None when the run trains
    on every token (no prompt to answer)."""
    import haliax as hax
    import numpy as np

    from alpaca_cli.core import decode
    from alpaca_cli.core.served_template import end_of_turn

    prompts = []
    for row in rows:
        trained = np.flatnonzero(row["targets"][1:]) + 1
        if not len(trained) or trained[0] < 2 or row["targets"][: trained[0]].sum() != 0:
            return None, 0
        prompts.append(row["input_ids"][: trained[0]].tolist())
    with hax.axis_mapping(COMPUTE):
        gens = decode.generate(model, prompts, max_new_tokens=max_new_tokens, max_len=model.Pos.size,
                               eos_ids=list(end_of_turn(tok, tok.chat_template).ids), pad_id=tok.pad_token_id or 0, real_vocab=len(tok))
    stopped = sum(g.finish == decode.EOS for g in gens)
    return stopped / len(gens), stopped


def _nll(logits, ids, targets) -> float:
    """Summed next-token negative log-likelihood over the trained positions."""
    import numpy as np

    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]][targets].sum())
