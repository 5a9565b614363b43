"""Every model family `alpaca train` accepts, end to end, on tiny random models that keep each family's quirks:
head_dim different from hidden/heads (Llama, Gemma, Gemma-2, Gemma-3, Qwen3, Mistral-Nemo), attention biases (Qwen2),
tied embeddings (Llama-3.2, Qwen2, Qwen3, Gemma, GPT-2), logit soft-capping and sliding windows (Gemma-2/3), MoE
routing (Mixtral), learned positions and Conv1D weights (GPT-2), GQA, and Llama-3's rope scaling.

For each: the first training step's loss equals transformers' on the same weights and Stanford's labels (so the
forward, the packing, the mask and the [PAD] rows are right for the family), `export --verify` holds (transformers
loads the export and computes Levanter's logits), and `alpaca generate` says what transformers' generate says on the
export. Families Levanter gets wrong are fixed in alpaca_cli/core/families.py; the rest are refused up front.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from helpers import read_records, run_cli

from alpaca_cli.rundir import open_run

pytestmark = pytest.mark.entry

BASE = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2)


def _config(family: str):
    import transformers as t

    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}  # short: the frequency remapping matters at 256 tokens
    return {
        "llama": lambda: t.LlamaConfig(**BASE, head_dim=32, max_position_embeddings=1024, rope_theta=500000.0,
                                       rope_scaling=llama3_rope, tie_word_embeddings=True),
        "mistral": lambda: t.MistralConfig(**BASE, head_dim=32, max_position_embeddings=4096, rope_theta=1e6,
                                           sliding_window=4096, tie_word_embeddings=False),
        "mixtral": lambda: t.MixtralConfig(**{**BASE, "intermediate_size": 96}, num_local_experts=4,
                                           num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=1e6,
                                           sliding_window=None, router_aux_loss_coef=0.02),
        "gemma": lambda: t.GemmaConfig(**BASE, head_dim=32, max_position_embeddings=8192,
                                       hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0),
        "gemma2": lambda: t.Gemma2Config(**BASE, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=8192,
                                         hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=3.0,
                                         attn_logit_softcapping=5.0, sliding_window=8, pad_token_id=0),
        "gemma3_text": lambda: t.Gemma3TextConfig(**BASE, head_dim=32, query_pre_attn_scalar=32,
                                                  max_position_embeddings=32768, rope_theta=1e6,
                                                  rope_local_base_freq=1e4, sliding_window=8,
                                                  layer_types=["sliding_attention", "full_attention"],
                                                  hidden_activation="gelu_pytorch_tanh", pad_token_id=0),
        "olmo2": lambda: t.Olmo2Config(**{**BASE, "num_key_value_heads": 4}, max_position_embeddings=4096,
                                       rope_theta=500000.0, pad_token_id=0),
        "qwen2": lambda: t.Qwen2Config(**BASE, max_position_embeddings=32768, rope_theta=1e6, use_sliding_window=False,
                                       tie_word_embeddings=True),
        "qwen3": lambda: t.Qwen3Config(**BASE, head_dim=32, max_position_embeddings=40960, rope_theta=1e6,
                                       tie_word_embeddings=True),
        "gpt2": lambda: t.GPT2Config(vocab_size=640, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1,
                                     eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    }[family]()


FAMILIES = ["llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "olmo2", "qwen2", "qwen3", "gpt2"]


def make_hf_model(folder: str, family: str, tokenizer_dir: str) -> str:
    """A tiny random model of the family, saved by transformers, with every weight jittered so norms and biases
    matter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager", torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def alpaca(args) -> str:
    """The command in this process (its compiled programs stay cached across families); its stdout."""
    from typer.testing import CliRunner

    from alpaca_cli.main import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


@pytest.fixture(scope="module")
def prepared_template(tmp_path_factory, fixture_data, tokenizer_dir):
    path = str(tmp_path_factory.mktemp("families") / "run")
    run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", path, "--max-length",
             "128", "-q"])
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_exports_verifies_and_generates(family, prepared_template, tmp_path, tokenizer_dir,
                                                      fixture_data):
    import torch
    from helpers import torch_loss_stanford
    from stanford_reference import PROMPT_DICT, stanford_tokenizer
    from transformers import AutoModelForCausalLM

    model_dir = make_hf_model(str(tmp_path / "base"), family, tokenizer_dir)
    run = str(tmp_path / "run")
    shutil.copytree(prepared_template, run)

    # one packed step holds every example: its loss is the token mean over all of Stanford's labels
    alpaca(["train", "--run-dir", run, "--model", model_dir, "--seq-len", "256", "--batch-size", "15", "--steps",
            "1", "--learning-rate", "1e-3", "--precision", "p=f32,c=f32", "-q"])
    first = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))][0]
    expected, count = torch_loss_stanford(model_dir, stanford_tokenizer(tokenizer_dir),
                                          read_records(fixture_data), 128)
    assert first["loss_tokens"] == count
    assert abs(first["loss"] - expected) < 1e-4, (family, first["loss"], expected)
    assert open_run(run).train.plan.model_type == family

    alpaca(["export", "--run-dir", run, "--verify"])
    verify = open_run(run).export.summary
    assert verify.verify_max_abs_diff < 1e-4 == verify.verify_tolerance, (family, verify)

    instruction = "Name three primary colors."
    ours = alpaca(["generate", instruction, "--run-dir", run, "--max-new-tokens", "12"]).rstrip("\n")
    tok = stanford_tokenizer(os.path.join(run, "hf"), use_fast=True)
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(run, "hf"), torch_dtype=torch.float32).eval()
    ids = tok(PROMPT_DICT["prompt_no_input"].format(instruction=instruction), return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    assert ours == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), family


def test_other_model_types_are_refused_before_anything_is_loaded(prepared_template, tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from alpaca_cli.errors import ConfigError
    from alpaca_cli.main import app

    other = tmp_path / "falcon"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    result = CliRunner().invoke(app, ["train", "--run-dir", prepared_template, "--model", str(other)])
    assert result.exit_code == 1 and isinstance(result.exception, ConfigError)
    assert result.exception.message.startswith(f"--model {other}: model_type 'falcon' is not supported; supported: "
                                               "gemma, gemma2, gemma3_text, gpt2, llama, mistral, mixtral, olmo2")


def test_settings_levanter_would_compute_differently_are_refused(prepared_template, tmp_path, tokenizer_dir):
    """Mistral-7B-v0.1's 4096-token sliding window: rows longer than the window would silently attend further
    than the checkpoint was trained to; a Llama with attention biases would silently lose them."""
    from typer.testing import CliRunner

    from alpaca_cli.main import app

    model_dir = make_hf_model(str(tmp_path / "mistral"), "mistral", tokenizer_dir)
    config = json.loads(open(os.path.join(model_dir, "config.json")).read())
    config["sliding_window"] = 128
    json.dump(config, open(os.path.join(model_dir, "config.json"), "w"))
    result = CliRunner().invoke(app, ["train", "--run-dir", prepared_template, "--model", model_dir,
                                      "--seq-len", "256"])
    assert result.exit_code == 1
    assert "sliding window (128 tokens) is shorter than --seq-len 256" in result.exception.message
    assert "use --seq-len 128 or less" in result.exception.message


def test_family_of_finds_the_family_from_each_of_its_names():
    """One record per family: its model_type, a Hugging Face config, the Levanter config alpaca builds from it and
    Levanter's own class (Mixtral's and Qwen's configs are subclasses of Mistral's and Llama's) all lead to it."""
    from levanter.models.lm_model import LmConfig

    from alpaca_cli.core import families
    from alpaca_cli.core.families import family_of

    assert sorted(families.FAMILIES) == sorted(FAMILIES)  # every family is tested end to end below
    for model_type, family in families.FAMILIES.items():
        hf = _config(model_type)
        assert family_of(model_type) is family and family_of(hf) is family
        assert family_of(family.config_class.from_hf_config(hf)) is family, model_type
        assert family_of(LmConfig.get_choice_class(family.levanter_choice)()) is family, model_type


def test_each_refusal_names_the_setting():
    from alpaca_cli.core.families import unsupported

    cases = [("llama", dict(attention_bias=True), "attention_bias / mlp_bias"),
             ("qwen3", dict(mlp_bias=True), "attention_bias / mlp_bias"),
             ("mistral", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "Levanter's mistral drops it"),
             ("mixtral", dict(head_dim=32), "head_dim 32 differs"),
             ("gpt2", dict(n_inner=100), "n_inner is not 4 x n_embd"),
             ("qwen2", dict(use_sliding_window=True, sliding_window=32), "its sliding window (32 tokens)")]
    for model_type, changes, message in cases:
        hf = _config(model_type)
        assert unsupported(hf, 64) == [], model_type
        for key, value in changes.items():
            setattr(hf, key, value)
        assert [p for p in unsupported(hf, 64) if message in p], (model_type, unsupported(hf, 64))


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_lora_is_refused_for_fused_and_expert_projections(family):
    from alpaca_cli.core import lora
    from alpaca_cli.errors import ConfigError

    lora.check_family("llama", "some/llama")
    with pytest.raises(ConfigError) as refused:
        lora.check_family(family, "some/model")
    assert refused.value.message == (f"--lora-r: LoRA is not available for {family} models (--model some/model); it "
                                     "is for llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, olmo2")


@pytest.mark.parametrize("family,rope", [("qwen3", {"rope_type": "linear", "factor": 2.0}),
                                         ("olmo2", {"type": "linear", "factor": 2.0})])
def test_rope_scaling_levanter_would_save_unreadably_is_refused(family, rope):
    """Qwen3 and OLMo-2 get no rope fix from us: with the scaling Levanter writes, transformers could not load the
    export. Without the refusal, the round trip below is what the export would meet."""
    from alpaca_cli.core.families import family_of, unsupported

    hf = _config(family)
    hf.rope_scaling = rope
    assert any("rope_scaling" in p and "cannot read back" in p for p in unsupported(hf, 64))
    with pytest.raises((KeyError, ValueError), match="rope_scaling"):
        family_of(family).config_class.from_hf_config(hf).to_hf_config(hf.vocab_size)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_linear_rope_scaling_is_saved_with_its_rope_type(family):
    """Levanter writes linear rope scaling as {"factor": f} with no rope_type, which transformers refuses (KeyError)
    when the converter builds the Hugging Face config of an export."""
    from alpaca_cli.core.families import family_of

    hf = _config(family)
    hf.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    saved = family_of(family).config_class.from_hf_config(hf).to_hf_config(hf.vocab_size)
    assert saved.rope_scaling == {"rope_type": "linear", "factor": 2.0}


# Published sizes (the Hub's safetensors parameter counts), against which Levanter's shapes built from the real
# config.json files are checked: a dropped head_dim, bias or expert would change the count.
PUBLISHED_PARAMETERS = {
    "Llama-2-7b-hf": 6_738_415_616,
    "Llama-2-13b-hf": 13_015_864_320,
    "Llama-3.1-8B": 8_030_261_248,
    "Mistral-7B-v0.1": 7_241_732_096,
    "Qwen2.5-7B": 7_615_616_512,
    "gemma-7b": 8_537_680_896,
    "gemma-2-9b": 9_241_705_984,
    "OLMo-2-1124-7B": 7_298_617_344,
    "Mixtral-8x7B-v0.1": 46_702_792_704,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_real_configs_build_the_published_shapes_without_weights(name):
    import equinox as eqx
    import haliax as hax
    import jax

    from alpaca_cli.core.models import open_base_model

    folder = os.path.join(os.path.dirname(__file__), "assets", "configs", name)
    with open_base_model(folder) as base:
        lev = base.lev_config(2048)
        vocab = base.hf_config.vocab_size
        shapes = eqx.filter_eval_shape(lev.build, hax.Axis("vocab", vocab), key=jax.random.PRNGKey(0))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes) if hasattr(x, "shape"))
    assert abs(count - PUBLISHED_PARAMETERS[name]) <= 1e-3 * PUBLISHED_PARAMETERS[name], (name, count)
    assert count == PUBLISHED_PARAMETERS[name]  # exactly, in fact


def test_gpt2_with_dropout_trains_with_it_and_exports_generates_and_evaluates_without_it(tmp_path, tokenizer_dir,
                                                                                       fixture_data):
    """A GPT-2 with its published dropout (0.1 on embeddings, residuals and attention): training applies it (the
    first step's loss is not transformers' eval-mode loss on the same weights and labels), every inference runs in
    evaluation mode: `export --verify` computes transformers' eval-mode logits, `generate` answers what transformers'
    generate answers on the export, `eval --base` scores transformers' eval-mode loss."""
    import torch
    import transformers as t
    from helpers import torch_loss_stanford, write_jsonl
    from stanford_reference import PROMPT_DICT, stanford_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = t.GPT2Config(vocab_size=640, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1,
                          eos_token_id=2)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1  # transformers' (and GPT-2's) default
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model_dir = str(tmp_path / "gpt2")
    hf.save_pretrained(model_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    records = [r for r in read_records(fixture_data) if len(r["instruction"]) + len(r["output"]) < 200]
    data = write_jsonl(str(tmp_path / "short.jsonl"), records)
    run = str(tmp_path / "run")

    alpaca(["prepare", "--data", data, "--tokenizer", tokenizer_dir, "--run-dir", run, "--max-length", "128", "-q"])
    alpaca(["train", "--run-dir", run, "--model", model_dir, "--seq-len", "512", "--batch-size", str(len(records)),
            "--steps", "2", "--learning-rate", "1e-3", "--precision", "p=f32,c=f32", "-q"])
    first = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))][0]
    eval_mode_loss, count = torch_loss_stanford(model_dir, stanford_tokenizer(tokenizer_dir), records, 128)
    assert first["loss_tokens"] == count and abs(first["loss"] - eval_mode_loss) > 1e-3  # dropout in training

    alpaca(["export", "--run-dir", run, "--verify"])
    verify = open_run(run).export.summary
    assert verify.verify_max_abs_diff < 1e-4 == verify.verify_tolerance, verify

    instruction = "Name three primary colors."
    ours = alpaca(["generate", instruction, "--run-dir", run, "--max-new-tokens", "12"]).rstrip("\n")
    tok = stanford_tokenizer(os.path.join(run, "hf"), use_fast=True)
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(run, "hf"), torch_dtype=torch.float32).eval()
    ids = tok(PROMPT_DICT["prompt_no_input"].format(instruction=instruction), return_tensors="pt").input_ids
    with torch.no_grad():
        out = exported.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
    assert ours == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    scores = json.loads(alpaca(["eval", "--data", data, "--run-dir", run, "--base", "--json", "--max-new-tokens",
                                "8"]))
    base = scores[1]
    assert base["model"] == "base" and base["trained_tokens"] == count
    assert abs(base["loss"] - eval_mode_loss) < 1e-4, (base["loss"], eval_mode_loss)


def test_inference_runs_without_dropout_and_training_with_it():
    """for_inference (what generate, eval, export --verify and the held-out loss run) turns every dropout off: two
    calls give the same logits, those of the same weights without dropout; the model it was given keeps training
    mode, where the training loss with a key is another one at every key."""
    import haliax as hax
    import jax
    import jax.numpy as jnp
    from levanter.layers.attention import AttentionMask
    from levanter.models.gpt2 import Gpt2Config

    from alpaca_cli.core.batches import PackedRow, build_row, make_loss_fn
    from alpaca_cli.core.logits import for_inference, model_logits
    from alpaca_cli.core.mesh import local_mesh

    shape = {"max_seq_len": 64, "hidden_dim": 32, "num_layers": 2, "num_heads": 4}
    Vocab = hax.Axis("vocab", 64)
    tokens = hax.named(jnp.arange(3, 35, dtype=jnp.int32), ("position",))
    with hax.partitioning.set_mesh(local_mesh()):
        dropout = Gpt2Config(**shape, embed_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
        model = dropout.build(Vocab, key=jax.random.PRNGKey(0))
        without = Gpt2Config(**shape).build(Vocab, key=jax.random.PRNGKey(0))  # the same weights, no dropout
        with pytest.raises(RuntimeError, match="Dropout requires a key"):
            model_logits(model, tokens, AttentionMask.causal())  # what inference did before

        evaluating = for_inference(model)
        once, twice = (model_logits(evaluating, tokens, AttentionMask.causal()).array for _ in range(2))
        np.testing.assert_array_equal(np.asarray(once), np.asarray(twice))
        np.testing.assert_allclose(np.asarray(once),
                                   np.asarray(model_logits(without, tokens, AttentionMask.causal()).array), atol=1e-6)
        training = model(tokens, AttentionMask.causal(), key=jax.random.PRNGKey(1)).array
        assert float(jnp.abs(training - once).max()) > 1e-3

        Pos = hax.Axis("position", 64)
        row = PackedRow(*(hax.named(jnp.asarray(a), Pos) for a in build_row([(np.arange(3, 40), np.ones(37))], 64, 0,
                                                                             1.0)))
        loss_fn = make_loss_fn(real_vocab=64)  # the trainer's loss, given a key by Levanter's train step
        eval_loss = float(loss_fn(evaluating, row)[0])
        train_losses = {float(loss_fn(model, row, key=jax.random.PRNGKey(k))[0]) for k in (1, 2)}
        assert len(train_losses) == 2 and all(abs(x - eval_loss) > 1e-4 for x in train_losses)
