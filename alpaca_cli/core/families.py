"""The model families alpaca trains, and where the pinned Levanter (marin-levanter 0.2.20.dev202606180959) still gets
one wrong: each fix is a subclass of Levanter's own config (or model) class, used as the converter's config class,
with the upstream symptom named. Every accepted family is tested end to end (tests/test_families.py: forward and
first-step loss equal transformers', packed equals alone, export --verify, generate); a checkpoint whose settings the
fixed classes would still compute differently is refused before anything is loaded (`unsupported`). Fixed upstream
since levanter 1.2.dev1644, ours removed: Qwen2's `no_bias` AttributeError (qwen.py:76 defaults it now), Gemma-3's
from_hf_config without @classmethod (gemma.py:867; ours builds on it).

| family         | upstream symptom (marin-levanter 0.2.20; levanter/models/ file:line)       | fix here              |
| -------------- | -------------------------------------------------------------------------- | --------------------- |
| llama          | from_hf_config drops head_dim (llama.py:116): "Shape mismatch" when it is  | AlpacaLlamaConfig;    |
|                | set; linear rope_scaling saved without rope_type                           | biases refused        |
|                | (levanter/layers/rotary.py:87): transformers' KeyError; attention_bias and |                       |
|                | mlp_bias never read, and use_bias would also put biases on the norms       |                       |
|                | (llama.py:191)                                                             |                       |
| mistral        | head_dim dropped (mistral.py:97, :165); sliding_window read but never      | AlpacaMistralConfig;  |
|                | given to the attention (mistral.py:165); rope_scaling dropped              | window, rope refused  |
|                | (mistral.py:99)                                                            |                       |
| mixtral        | jit_log in the forward (mixtral.py:580) is an io_callback                  | loss under            |
|                | (levanter/tracker/tracker_fns.py:110): "IO callbacks do not support JVP";  | defer_tracker_for_jit |
|                | aux loss a 0-d NamedArray (mixtral.py:661); always adds a router z-loss    | (batches.py);         |
|                | (rzl_coef 0.001, :84) and the load-balancing loss (:153), which            | AlpacaMixtralConfig   |
|                | transformers trains on only with output_router_logits                      |                       |
| gemma          | attention_config passes no head_dim (gemma.py:233): "Shape mismatch" for   | AlpacaGemmaConfig     |
|                | every real Gemma (16 x 256 != 3072); hidden_act gelu run as tanh           |                       |
|                | (gemma.py:145: both branches pick gelu_pytorch_tanh)                       |                       |
| gemma2         | attention_config: no head_dim, no query_pre_attn_scalar (gemma.py:575);    | AlpacaGemma2Config,   |
|                | from_hf_config reads neither soft-cap (keeps 30, 50) nor the window        | ...LMHeadModel        |
|                | (gemma.py:543); the final soft-cap is never applied                        |                       |
| gemma3_text    | from_hf_config (gemma.py:867) reads no soft-cap, window, layer types or    | AlpacaGemma3Config    |
|                | attention bias; attention_config: no head_dim, query scaling or soft-cap   |                       |
|                | (gemma.py:902); every layer global, on the global RoPE base                |                       |
| qwen2          | linear rope_scaling saved without rope_type (as llama)                     | AlpacaQwen2Config     |
| gpt2           | position table sized by the training seq_len (gpt2.py:308): "Shape         | AlpacaGpt2Config      |
|                | mismatch" unless --seq-len equals n_positions                              |                       |
| olmo2, qwen3   | rope scaling saved in a form transformers refuses (layers/rotary.py:87)    | Levanter's classes;   |
|                |                                                                            | that scaling refused  |

Gemma-2/3's sliding-window layers get their window through Levanter's AttentionConfig.sliding_window (applied by its
Attention, levanter/layers/attention.py:1349), set per layer here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

import equinox as eqx
import haliax as hax
import haliax.nn as hnn
import jax.numpy as jnp
import jax.random as jrandom
from haliax.jax_utils import maybe_rng_split, shaped_rng_split
from haliax.nn.scan import BlockSeq, ScanCheckpointPolicy, Stacked
from levanter.layers.rotary import DefaultRotaryEmbeddingsConfig, RotaryEmbeddingsConfig
from levanter.models.gemma import (
    Gemma2Config,
    Gemma2DecoderLayer,
    Gemma2LMHeadModel,
    Gemma2Transformer,
    Gemma3Config,
    Gemma3LMHeadModel,
    GemmaConfig,
)
from levanter.models.gpt2 import Gpt2Config, Gpt2Embeddings, Gpt2LMHeadModel, Gpt2Transformer
from levanter.models.llama import LlamaConfig, LlamaEmbedding
from levanter.models.lm_model import LmConfig
from levanter.models.mistral import MistralConfig
from levanter.models.mixtral import MixtralConfig
from levanter.models.qwen import QwenConfig
from levanter.utils.activation import ActivationFunctionEnum

def _rebuild(cls, base, **changes):
    """An instance of `cls` (a subclass of type(base)) with base's field values, then `changes`."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    values.update(changes)
    return cls(**values)


def _gelu(name: str | None) -> ActivationFunctionEnum:
    return ActivationFunctionEnum.gelu if name == "gelu" else ActivationFunctionEnum.gelu_new


# ---------------------------------------------------------------- rope: linear scaling written without rope_type
@dataclass(frozen=True)
class LinearRotaryEmbeddingsConfig(DefaultRotaryEmbeddingsConfig):
    """DefaultRotaryEmbeddingsConfig.to_hf_config (rotary.py:87) writes {"factor": f} with no rope_type, which
    transformers rejects (KeyError) when save_pretrained builds the HF config."""

    def to_hf_config(self):
        theta, scaling = super().to_hf_config()
        return theta, None if scaling is None else {"rope_type": "linear", **scaling}


def _fix_rope(rope):
    if type(rope) is DefaultRotaryEmbeddingsConfig and rope.factor != 1.0:
        return LinearRotaryEmbeddingsConfig(theta=rope.theta, factor=rope.factor)
    return rope


# ---------------------------------------------------------------- llama: head_dim dropped, linear rope on save
@dataclass(frozen=True)
class AlpacaLlamaConfig(LlamaConfig):
    @classmethod
    def from_hf_config(cls, hf_config):
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            # Levanter's use_bias would also add biases to the RMSNorms; it silently drops them today
            raise ValueError("Llama checkpoints with attention_bias/mlp_bias are not supported")
        base = LlamaConfig.from_hf_config(hf_config)
        return _rebuild(cls, base, head_dim=getattr(hf_config, "head_dim", None), rope=_fix_rope(base.rope))


# ---------------------------------------------------------------- qwen2: linear rope on save
@dataclass(frozen=True)
class AlpacaQwen2Config(QwenConfig):
    @classmethod
    def from_hf_config(cls, hf_config):
        base = QwenConfig.from_hf_config(hf_config)
        return _rebuild(cls, base, rope=_fix_rope(base.rope))


# ---------------------------------------------------------------- mistral: head_dim dropped (Mistral-Nemo)
@dataclass(frozen=True)
class AlpacaMistralConfig(MistralConfig):
    @classmethod
    def from_hf_config(cls, hf_config):
        base = MistralConfig.from_hf_config(hf_config)
        return _rebuild(cls, base, head_dim=getattr(hf_config, "head_dim", None),
                        tie_word_embeddings=False)  # MistralLMHeadModel always has an lm_head

    def attention_config(self):
        return dataclasses.replace(super().attention_config(), head_dim=self.head_dim)


# ---------------------------------------------------------------- gemma: head_dim dropped in attention_config
@dataclass(frozen=True)
class AlpacaGemmaConfig(GemmaConfig):
    @classmethod
    def from_hf_config(cls, hf_config):
        # transformers' GemmaMLP runs ACT2FN[config.hidden_act]; Levanter always takes the tanh approximation
        return _rebuild(cls, GemmaConfig.from_hf_config(hf_config), activation_function=_gelu(hf_config.hidden_act))

    def attention_config(self):
        return dataclasses.replace(super().attention_config(), head_dim=self.head_dim)


# ---------------------------------------------------------------- gemma2 / gemma3: per-layer attention
class _PerLayerMixin:
    """Gemma-2/3 layers differ: 'sliding_attention' layers use a window (and, in Gemma-3, their own RoPE base)."""

    def _local_rope(self) -> RotaryEmbeddingsConfig:
        return self.rope

    def layer_config(self, i: int):
        kinds = self.layer_types or ("full_attention",) * self.num_layers
        if kinds[i] != "sliding_attention":
            return self
        window = self.sliding_window
        if window is not None and window >= self.max_seq_len:
            window = None  # never narrower than the row: exact without a window
        return dataclasses.replace(self, layer_window=window, rope=self._local_rope())


class AlpacaGemma2Transformer(Gemma2Transformer):
    @staticmethod
    def init(config, *, key):
        n = config.num_layers
        configs = [config.layer_config(i) for i in range(n)]
        if all(c == configs[0] for c in configs):  # homogeneous: keep Levanter's scanned stack
            layers = Stacked.init(config.Layers, Gemma2DecoderLayer,
                                  gradient_checkpointing=config.gradient_checkpointing)(
                configs[0], key=shaped_rng_split(key, n))
        else:  # layers differ in static config (window, RoPE base): an unrolled sequence
            keys = jrandom.split(key, n)
            layers = BlockSeq([Gemma2DecoderLayer.init(c, key=k) for c, k in zip(configs, keys)],
                              config.Layers, ScanCheckpointPolicy.from_bool_or_str(config.gradient_checkpointing))
        return AlpacaGemma2Transformer(config, layers, config.mk_LayerNorm(config.Embed))

    def __call__(self, x, attn_mask, *, key, pos_ids=None):
        if isinstance(self.layers, Stacked):
            return super().__call__(x, attn_mask, key=key, pos_ids=pos_ids)
        keys = maybe_rng_split(key, self.config.num_layers) if key is not None else [None] * self.config.num_layers
        for layer, k in zip(self.layers.blocks, keys):
            call = lambda lyr, h, k=k: lyr(h, attn_mask, key=k, pos_ids=pos_ids)  # noqa: E731
            if self.config.gradient_checkpointing:
                call = eqx.filter_checkpoint(call)
            x = call(layer, x)
        return self.norm(x)


def _softcap(config, logits):
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    return hax.tanh(logits / cap) * cap if isinstance(logits, hax.NamedArray) else jnp.tanh(logits / cap) * cap


def _init_gemma_head(cls, Vocab, config, key):
    k_t, k_emb = jrandom.split(key, 2)
    transformer = AlpacaGemma2Transformer.init(config, key=k_t)
    embeddings = LlamaEmbedding.init(Vocab, config, key=k_emb)
    lm_head = None if config.tie_word_embeddings else hnn.Linear.init(
        In=config.Embed, Out=Vocab, key=k_emb, use_bias=False, out_first=True)
    return cls(transformer, embeddings, lm_head)


class AlpacaGemma2LMHeadModel(Gemma2LMHeadModel):
    @classmethod
    def init(cls, Vocab, config, *, key):
        return _init_gemma_head(cls, Vocab, config, key)

    def __call__(self, input_ids, attn_mask=None, *, key=None, pos_ids=None):
        return _softcap(self.config, super().__call__(input_ids, attn_mask, key=key, pos_ids=pos_ids))


class AlpacaGemma3LMHeadModel(Gemma3LMHeadModel):
    @classmethod
    def init(cls, Vocab, config, *, key):
        return _init_gemma_head(cls, Vocab, config, key)

    def __call__(self, input_ids, attn_mask=None, *, key=None, pos_ids=None):
        return _softcap(self.config, super().__call__(input_ids, attn_mask, key=key, pos_ids=pos_ids))


@dataclass(frozen=True)
class AlpacaGemma2Config(_PerLayerMixin, Gemma2Config):
    layer_types: Optional[tuple] = None
    layer_window: Optional[int] = None  # set only in one layer's copy of the config

    @classmethod
    def from_hf_config(cls, hf_config):
        base = Gemma2Config.from_hf_config(hf_config)
        return _rebuild(
            cls, base,
            final_logit_softcapping=hf_config.final_logit_softcapping,  # Levanter keeps its defaults (30, 50)
            attn_logit_softcapping=hf_config.attn_logit_softcapping,
            sliding_window=hf_config.sliding_window,
            layer_types=tuple(getattr(hf_config, "layer_types", None)
                              or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                  for i in range(hf_config.num_hidden_layers)]),
        )

    def attention_config(self):
        return dataclasses.replace(super().attention_config(), head_dim=self.head_dim,
                                   scaling_factor=self.query_pre_attn_scalar ** -0.5, sliding_window=self.layer_window)

    @property
    def model_type(self):
        return AlpacaGemma2LMHeadModel


@dataclass(frozen=True)
class AlpacaGemma3Config(_PerLayerMixin, Gemma3Config):
    layer_types: Optional[tuple] = None
    layer_window: Optional[int] = None

    @classmethod
    def from_hf_config(cls, hf):
        hf = getattr(hf, "text_config", hf)
        base = Gemma3Config.from_hf_config(hf)
        return _rebuild(
            cls, base,
            rope=_fix_rope(base.rope),
            final_logit_softcapping=hf.final_logit_softcapping,  # Levanter reads neither cap, the window, the
            attn_logit_softcapping=hf.attn_logit_softcapping,    # layer types nor the attention bias
            sliding_window=hf.sliding_window,
            layer_types=tuple(hf.layer_types),
            use_bias=bool(getattr(hf, "attention_bias", False)),
        )

    def _local_rope(self):
        # transformers: local layers use plain RoPE at rope_local_base_freq; rope_scaling is for global layers only
        return DefaultRotaryEmbeddingsConfig(theta=self.rope_local_base_freq)

    def attention_config(self):
        return dataclasses.replace(super().attention_config(), head_dim=self.head_dim,
                                   scaling_factor=self.query_pre_attn_scalar ** -0.5,
                                   logits_soft_cap=self.attn_logit_softcapping, sliding_window=self.layer_window)

    @property
    def model_type(self):
        return AlpacaGemma3LMHeadModel


# ---------------------------------------------------------------- gpt2: position table sized by training seq_len
class AlpacaGpt2LMHeadModel(Gpt2LMHeadModel):
    @classmethod
    def init(cls, Vocab, config, *, key):
        k_t, k_embeddings = jrandom.split(key, 2)
        transformer = Gpt2Transformer.init(config, key=k_t)
        # Levanter sizes wpe by config.max_Pos (= our training seq_len); the checkpoint has n_positions rows
        table = dataclasses.replace(config, max_seq_len=config.n_positions or config.max_seq_len)
        embeddings = Gpt2Embeddings.init(Vocab, table, key=k_embeddings)
        return cls(transformer, embeddings)


@dataclass(frozen=True)
class AlpacaGpt2Config(Gpt2Config):
    n_positions: Optional[int] = None

    @classmethod
    def from_hf_config(cls, hf_config):
        return _rebuild(cls, Gpt2Config.from_hf_config(hf_config), n_positions=hf_config.n_positions)

    @property
    def model_type(self):
        return AlpacaGpt2LMHeadModel


# ---------------------------------------------------------------- mixtral: transformers' objective
@dataclass(frozen=True)
class AlpacaMixtralConfig(MixtralConfig):
    @classmethod
    def from_hf_config(cls, hf_config):
        # transformers trains Mixtral on the LM loss, plus router_aux_loss_coef x the load-balancing loss only when
        # output_router_logits is set, and has no router z-loss; Levanter adds both always (0.02 and 0.001)
        base = MixtralConfig.from_hf_config(hf_config)
        lbl = hf_config.router_aux_loss_coef if getattr(hf_config, "output_router_logits", False) else None
        return _rebuild(cls, base, lbl_coef=lbl, rzl_coef=None)


# ---------------------------------------------------------------- the families
def _window(hf_config) -> Optional[int]:
    window = getattr(hf_config, "sliding_window", None)
    return int(window) if window else None


def _window_if_used(hf_config) -> Optional[int]:
    return _window(hf_config) if getattr(hf_config, "use_sliding_window", False) else None


def _rope_dropped(hf_config) -> Optional[str]:
    if getattr(hf_config, "rope_scaling", None):
        return f"rope_scaling {hf_config.rope_scaling} (Levanter's {hf_config.model_type} drops it)"
    return None


def _rope_unreadable(hf_config, only_linear: bool) -> Optional[str]:
    # Levanter writes linear scaling as {"factor": f} (layers/rotary.py:87; transformers: KeyError), and OLMo-2's
    # config accepts only the old `type` key (transformers: ValueError): the export would not load
    rope = getattr(hf_config, "rope_scaling", None) or {}
    if rope and (not only_linear or (rope.get("rope_type") or rope.get("type")) == "linear"):
        return (f"rope_scaling {hf_config.rope_scaling} (Levanter's {hf_config.model_type} saves it in a form "
                "transformers cannot read back, so the export would not load)")
    return None


def _head_dim_derived(hf_config) -> Optional[str]:
    hd = getattr(hf_config, "head_dim", None)
    if hd and hd != hf_config.hidden_size // hf_config.num_attention_heads:
        return (f"head_dim {hd} differs from hidden_size / num_attention_heads (Levanter's {hf_config.model_type} "
                "derives it)")
    return None


def _biases(hf_config) -> Optional[str]:
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        return "attention_bias / mlp_bias (Levanter drops these biases or puts them on the norms)"
    return None


def _n_inner(hf_config) -> Optional[str]:
    if getattr(hf_config, "n_inner", None) not in (None, 4 * hf_config.n_embd):
        return "n_inner is not 4 x n_embd (Levanter's gpt2 always uses 4x)"
    return None


@dataclass(frozen=True)
class Family:
    """What alpaca knows of one model family, keyed by Hugging Face's `model_type` (FAMILIES)."""

    model_type: str
    levanter_choice: str
    """Levanter's LmConfig choice name for the family."""
    fixed_config: Optional[type] = None
    """Our subclass of Levanter's config, where Levanter gets the family wrong (the table above)."""
    ignore_prefix: Optional[str] = None
    """The checkpoint key prefix Levanter's converter strips (GPT-2's weights live under `transformer.`)."""
    window: Optional[Callable] = None
    """hf_config -> the sliding window the checkpoint uses and Levanter's model does not implement (or None)."""
    refusals: tuple = ()
    """hf_config -> a setting Levanter's (fixed) model would silently compute differently (or None), in order."""
    lora: bool = True
    """Whether LoRA is offered: the projections are plain linear layers named as transformers names them (PEFT finds
    them by name). Not GPT-2 (fused Conv1D projections) or Mixtral (expert tensors)."""
    decoder: str = "llama"
    """How the KV-cached decoder (decode.py) runs a layer: "llama" (norm, attention, norm, MLP), "moe" (the MLP a
    mixture of experts), "gemma2" (four norms, per-layer window), "olmo2" (norms after attention and MLP only),
    "gpt2" (fused QKV projection, learned positions)."""
    scaled_embeddings: bool = False
    """The embeddings are multiplied by sqrt(hidden) before the first layer (Gemma)."""

    @property
    def config_class(self):
        """The Levanter config class alpaca uses for the family (ours where Levanter needs a fix)."""
        return self.fixed_config or LmConfig.get_choice_class(self.levanter_choice)


FAMILIES = {f.model_type: f for f in (
    Family("llama", "llama", AlpacaLlamaConfig, refusals=(_biases,)),
    Family("mistral", "mistral", AlpacaMistralConfig, window=_window, refusals=(_rope_dropped,)),
    Family("qwen2", "qwen", AlpacaQwen2Config, window=_window_if_used),
    Family("qwen3", "qwen3", window=_window_if_used,
           refusals=(partial(_rope_unreadable, only_linear=True), _biases)),
    Family("gemma", "gemma", AlpacaGemmaConfig, scaled_embeddings=True),
    Family("gemma2", "gemma2", AlpacaGemma2Config, decoder="gemma2", scaled_embeddings=True),
    Family("gemma3_text", "gemma3", AlpacaGemma3Config, decoder="gemma2", scaled_embeddings=True),
    Family("olmo2", "olmo2", refusals=(partial(_rope_unreadable, only_linear=False),), decoder="olmo2"),
    Family("mixtral", "mixtral", AlpacaMixtralConfig, window=_window, refusals=(_rope_dropped, _head_dim_derived),
           lora=False, decoder="moe"),
    Family("gpt2", "gpt2", AlpacaGpt2Config, ignore_prefix="transformer", refusals=(_n_inner,), lora=False,
           decoder="gpt2"),
)}
"""Every family alpaca trains, by Hugging Face `model_type`; any other checkpoint is refused."""


def family_of(x: Union[str, object]) -> Family:
    """The family of a Hugging Face model_type, a Hugging Face config, a Levanter config or a Levanter model
    (KeyError if none)."""
    model_type = getattr(x, "model_type", x)
    if isinstance(model_type, str):  # Hugging Face's configs name it; Levanter's `model_type` is the model class
        return FAMILIES[model_type]
    config = x if isinstance(x, LmConfig) else x.config
    for cls in type(config).__mro__:  # the most derived first: MixtralConfig is a MistralConfig
        for family in FAMILIES.values():
            if cls is family.config_class or cls is LmConfig.get_choice_class(family.levanter_choice):
                return family
    raise KeyError(type(config).__name__)


def sliding_window_limit(hf_config) -> Optional[int]:
    """The longest row the fixed Levanter model computes exactly: families whose sliding window Levanter does not
    implement (Mistral, Mixtral, Qwen with use_sliding_window) match transformers only up to the window."""
    window = family_of(hf_config).window
    return window(hf_config) if window else None


def unsupported(hf_config, seq_len: int) -> list[str]:
    """Settings of a checkpoint the (fixed) Levanter model would silently compute differently at this row length."""
    mt, problems = hf_config.model_type, []
    window = sliding_window_limit(hf_config)
    if window is not None and seq_len > window:
        problems.append(f"its sliding window ({window} tokens) is shorter than --seq-len {seq_len}, and Levanter's "
                        f"{mt} has no sliding window: use --seq-len {window} or less")
    found = (refusal(hf_config) for refusal in family_of(hf_config).refusals)
    return problems + [p for p in found if p]


def final_logit_softcap(model, logits):
    """Gemma-2/3's final_logit_softcapping (tanh(x / cap) * cap), for logits made from activations @ lm_head (the
    training loss); a no-op for other families. The fixed Gemma models' own call applies it too."""
    return _softcap(model.config, logits)
