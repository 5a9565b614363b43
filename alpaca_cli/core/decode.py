"""Batched decoding with a KV cache: the prompts are prefilled by length bucket into their rows of the cache, then one
compiled loop of one-token steps decodes the whole batch, with sampling and a per-row stop at EOS.

Why not Levanter's InferenceEngine (benchmarks/ab_engine.py, measured in benchmarks/README.md): the same tokens, but
slower on CPU (its prefill off TPU is a one-query-at-a-time loop), only Llama, Qwen3 and Apertus have its `decode`,
and requests that do not fit its one prefill come back empty. Here each family's own modules do the work
(projections, norms, rotary embeddings, MLP or experts, as in training); only the cache write and the attention
(Levanter's vanilla arithmetic, on raw arrays in the cache's layout) are ours.

- The cache: one dense K and one V buffer per model, K {layer, batch, kv_head, head_size, key_position} and V
  {layer, batch, kv_head, key_position, head_size}. It starts just wider than the longest prompt and doubles when
  the longest answer needs it.
- Prompts are padded on the right; every row keeps its real positions (so rotary and learned position embeddings see
  exactly the unpadded prompt), and the causal test `key position <= query position` (with a sliding window where
  the family has one) is the only mask: a pad's cache slot is overwritten by the first generated token before any
  query can see it.
- Sampling: greedy at temperature 0, else softmax(logits / temperature) cut to the smallest set of tokens whose
  probability reaches top_p. Each request's key depends only on (seed, request index, position), so an answer does
  not depend on which other requests share its batch: a rerun, or a resumed file, produces the same answers.
- Ids past the tokenizer's vocabulary (the embedding rows padded for sharding) are never produced.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
from haliax import NamedArray

from alpaca_cli.core.families import family_of, final_logit_softcap

EOS, LENGTH = "eos", "length"
"""Why a sequence stopped: it produced an end-of-sequence token, or it reached max_new_tokens (or the context)."""


class KVCache(eqx.Module):
    k: NamedArray  # {layer, batch, kv_head, head_size, key_position}: keys last, so q.K is a plain matmul on CPU
    v: NamedArray  # {layer, batch, kv_head, key_position, head_size}


@dataclass
class Generation:
    tokens: list[int]
    """The new tokens, the EOS included when one was produced."""
    finish: str
    """EOS or LENGTH."""


def supports(model) -> bool:
    """Whether this decoder knows the model's family (families.Family.decoder)."""
    try:
        return family_of(model).decoder in _LAYERS
    except KeyError:
        return False


def _kv_dims(model) -> tuple[int, int]:
    if family_of(model).decoder == "gpt2":  # no attention_config: one K/V head per query head
        return model.config.Heads.size, model.config.HeadSize.size
    ac = model.config.attention_config()
    return ac.KVHeads.size, ac.HeadSize.size


def init_cache(model, batch: int, width: int, dtype) -> KVCache:
    kv_heads, head_size = _kv_dims(model)
    lead = {"layer": model.config.num_layers, "batch": batch, "kv_head": kv_heads}
    return KVCache(hax.zeros({**lead, "head_size": head_size, "key_position": width}, dtype=dtype),
                   hax.zeros({**lead, "key_position": width, "head_size": head_size}, dtype=dtype))


def _grow(cache: KVCache, width: int) -> KVCache:
    """The cache with `width` key slots, the new ones empty (one copy, once per decoding phase)."""
    def pad(a: NamedArray) -> NamedArray:
        axis = a.axis_indices("key_position")
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, width - a.array.shape[axis])
        axes = tuple(ax.resize(width) if ax.name == "key_position" else ax for ax in a.axes)
        return hax.named(jnp.pad(a.array, widths), axes)
    return KVCache(pad(cache.k), pad(cache.v))


def layout_for(model, rows: int):
    """The model with its projection weights stored in the order that decoding `rows` rows at a time runs fastest
    in on this platform: input-first ({..., in, out}) on CPU for more than one row, else output-first ({..., out,
    in}: most of Levanter's modules; GPT-2's are input-first).
    The same values and names (haliax contracts by name), so every other use of the model is unchanged; holders
    convert once (one copy of each weight while it is converted) and keep the result.

    XLA's CPU backend multiplies several rows by a transposed weight slowly, and one row by an input-first weight
    slowly too (benchmarks/README.md, bench_generate.py). GPUs and TPUs pick their own layouts: unchanged there."""
    import haliax.nn as hnn

    if jax.default_backend() != "cpu":
        return model
    input_first = rows > 1

    def relayout(m):
        if not isinstance(m, hnn.Linear) or m.weight is None:
            return m
        ins, outs = ([a.name for a in hax.axis_spec_to_tuple(spec)] for spec in (m.In, m.Out))
        other = [a.name for a in m.weight.axes if a.name not in ins + outs]
        order = tuple(other + (ins + outs if input_first else outs + ins))
        if tuple(a.name for a in m.weight.axes) == order:
            return m
        return eqx.tree_at(lambda lin: lin.weight, m, m.weight.rearrange(order))

    return jax.tree_util.tree_map(relayout, model, is_leaf=lambda m: isinstance(m, hnn.Linear))


# -- attention over the cache ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Where new tokens go. rows: the cache row of each batch row (None: the same index; an index past the cache
    drops the row's writes). prefill: whole prompts at positions 0..P-1, which attend over their own keys."""
    rows: jax.Array | None = None
    prefill: bool = False


def _write(buf, layer_idx, rows, start, new, keys_last: bool):
    """buf [layer, row, kv_head, key_position, head_size] (keys_last: [layer, row, kv_head, head_size,
    key_position]) with new [b, t, kv_head, head_size] written at layer `layer_idx`, row rows[b] (b if rows is None;
    a row past the buffer writes nothing), positions start[b] + 0..t-1.

    One dynamic_update_slice per row, which XLA does in place; a scatter (`buf.at[layer, rows, :, pos, :].set`)
    would copy the whole cache at every layer of every step."""
    n_rows = buf.shape[1]
    for b in range(new.shape[0]):
        block = jnp.transpose(new[b], (1, 2, 0) if keys_last else (1, 0, 2))[None, None]
        row = b if rows is None else jnp.minimum(rows[b], n_rows - 1)
        at = (layer_idx, row, 0, 0, start[b]) if keys_last else (layer_idx, row, 0, start[b], 0)
        if rows is not None:  # a padding row (index past the buffer) puts back what is there
            block = jnp.where(rows[b] < n_rows, block, jax.lax.dynamic_slice(buf, at, block.shape))
        buf = jax.lax.dynamic_update_slice(buf, block, at)
    return buf


def _attend(q, k, v, pos_ids, cache: KVCache, layer_idx, *, scaling_factor=None, soft_cap=None, upcast=True,
            window=None, span: Span = Span()):
    """Write k, v {batch, position, kv_head, head_size} at (layer, rows[b], pos_ids[b, t]) of the cache and attend q
    {batch, position, kv_head, q_heads_per_group, head_size} over the keys at or before each query.

    prefill: the new tokens are whole prompts at positions 0..P-1, so they attend over their own keys (the cache
    is only written). Else (a decoding step, rows = the cache's rows) over every slot of the cache (slots past a
    row's position are masked)."""
    kn = k.rearrange(("batch", "position", "kv_head", "head_size")).array.astype(cache.k.dtype)
    vn = v.rearrange(("batch", "position", "kv_head", "head_size")).array.astype(cache.v.dtype)
    start = pos_ids.array[:, 0]  # a row's new tokens sit at consecutive positions
    cache = KVCache(hax.named(_write(cache.k.array, layer_idx, span.rows, start, kn, keys_last=True), cache.k.axes),
                    hax.named(_write(cache.v.array, layer_idx, span.rows, start, vn, keys_last=False), cache.v.axes))
    if span.prefill:  # the same values a decoding step reads back from the cache (its dtype), without reading it
        keys, values = jnp.transpose(kn, (0, 2, 3, 1)), jnp.transpose(vn, (0, 2, 1, 3))
    else:
        keys, values = cache.k.array[layer_idx], cache.v.array[layer_idx]
    qa = q.rearrange(("batch", "kv_head", "q_heads_per_group", "position", "head_size")).array
    query_pos = pos_ids.rearrange(("batch", "position")).array
    kw = dict(scaling_factor=scaling_factor, soft_cap=soft_cap, upcast=upcast, window=window)
    t = qa.shape[3]
    if span.prefill and t >= 512:
        # causal: a chunk of queries reads only the keys up to its last position (a 1,024-token prompt in 4 chunks
        # computes 10/16 of the scores)
        chunk = t // 4
        out = jnp.concatenate([_attention(qa[:, :, :, c : c + chunk], keys[..., : c + chunk],
                                          values[:, :, : c + chunk], query_pos[:, c : c + chunk], **kw)
                               for c in range(0, t, chunk)], axis=3)
    else:
        out = _attention(qa, keys, values, query_pos, **kw)
    return hax.named(out, ("batch", "kv_head", "q_heads_per_group", "position", "head_size")), cache


def _attention(q, keys, values, query_pos, *, scaling_factor, soft_cap, upcast, window):
    """q [b, kv_head, group, t, head_size] at query_pos [b, t] over keys [b, kv_head, head_size, w] and values
    [b, kv_head, w, head_size] at positions 0..w-1: each query sees the keys at or before its position (the last
    `window` of them where the layer has one).

    Levanter's simple_attention_with_dropout (its VANILLA backend, which the model's own call uses here), step for
    step, on raw arrays with the keys stored key-position-last, so the scores are a plain batched matmul without
    the copy and transpose of each layer's keys that XLA's CPU backend makes for haliax's dot over keys stored
    {key_position, head_size}."""
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    adtype = jnp.float32 if upcast else q.dtype
    if scaling_factor is None:
        scaling_factor = 1.0 / jnp.sqrt(q.shape[-1])
    scores = jnp.einsum("bkgtd,bkdw->bkgtw", (q * scaling_factor).astype(adtype), keys.astype(adtype))
    if soft_cap is not None:
        scores = jnp.tanh(scores / soft_cap) * soft_cap
    key_pos = jnp.arange(keys.shape[-1])[None, None, :]
    mask = key_pos <= query_pos[:, :, None]  # [b, t, w]
    if window is not None:
        mask = mask & (key_pos > query_pos[:, :, None] - window)
    scores = jnp.where(mask[:, None, None], scores, -1e9)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgtw,bkwd->bkgtd", weights, values)


def _cached_attention(attn, x, pos_ids, cache, layer_idx, window=None, span=Span()):
    """Levanter's Attention module over new tokens, its K/V appended to the cache."""
    q, k, v = attn._compute_qkv(x, key=None, pos_ids=pos_ids)  # projections, qk-norm and rotary as in training
    cfg = attn.config
    out, cache = _attend(q, k, v, pos_ids, cache, layer_idx, scaling_factor=cfg.scaling_factor,
                         soft_cap=cfg.logits_soft_cap, upcast=cfg.upcast_attn, window=window, span=span)
    out = out.flatten_axes(("kv_head", "q_heads_per_group"), "heads").astype(x.dtype)
    return attn.o_proj(out, key=None), cache


def _gpt2_block(block, x, pos_ids, cache, i, span=Span()):
    cfg = block.attn.config
    h = block.ln_1(x)
    q, k, v = block.attn.c_attn(h, key=None).rearrange((..., "qkv", "heads", "position", "head_size")).unbind("qkv")
    if cfg.scale_attn_by_inverse_layer_idx:
        q = q / (i + 1.0)
    q = q.rename({"heads": "kv_head"}).broadcast_axis(hax.Axis("q_heads_per_group", 1))
    k, v = k.rename({"heads": "kv_head"}), v.rename({"heads": "kv_head"})
    out, cache = _attend(q, k, v, pos_ids, cache, i, upcast=cfg.upcast_attn, span=span)
    out = out["q_heads_per_group", 0].rename({"kv_head": "heads"}).astype(x.dtype)
    x = x + block.attn.c_proj(out, key=None)
    return x + block.mlp(block.ln_2(x), key=None), cache


def _gemma2_layer(layer, x, pos_ids, cache, i, span=Span()):
    """Gemma-2/3: four norms; sliding layers carry their window."""
    window = getattr(layer.config, "layer_window", None)
    a, cache = _cached_attention(layer.self_attn, layer.input_layernorm(x), pos_ids, cache, i, window, span)
    x = x + layer.post_attention_layernorm(a)
    m = layer.mlp(layer.pre_feedforward_layernorm(x), key=None)
    return x + layer.post_feedforward_layernorm(m), cache


def _olmo2_layer(layer, x, pos_ids, cache, i, span=Span()):
    """OLMo-2: norms after attention and MLP only."""
    a, cache = _cached_attention(layer.self_attn, x, pos_ids, cache, i, span=span)
    x = x + layer.post_attention_layernorm(a)
    return x + layer.post_feedforward_layernorm(layer.mlp(x, key=None)), cache


def _llama_layer(layer, x, pos_ids, cache, i, span=Span(), moe=False):
    """Llama and the families built like it: norm, attention, norm, MLP (moe: Mixtral's experts)."""
    a, cache = _cached_attention(layer.self_attn, layer.input_layernorm(x), pos_ids, cache, i, span=span)
    if getattr(layer, "post_attn_layernorm", None) is not None:  # Llama's hybrid norm
        a = layer.post_attn_layernorm(a)
    x = x + a
    h = layer.post_attention_layernorm(x)
    if moe:
        m, _ = layer.block_sparse_moe(h, key=None)
        if getattr(layer, "shared_mlp", None) is not None:
            m = m + layer.shared_mlp(h, key=None)
    else:
        m = layer.mlp(h, key=None)
    if getattr(layer, "post_mlp_layernorm", None) is not None:
        m = layer.post_mlp_layernorm(m)
    return x + m, cache


_LAYERS = {
    "llama": _llama_layer,
    "moe": functools.partial(_llama_layer, moe=True),
    "gemma2": _gemma2_layer,
    "olmo2": _olmo2_layer,
    "gpt2": _gpt2_block,
}
"""One decoder layer with the cache, by families.Family.decoder; the wiring mirrors each family's __call__ in
levanter/models/*.py."""


def forward_cached(model, tokens: NamedArray, pos_ids: NamedArray, cache: KVCache, span: Span = Span()
                   ) -> tuple[NamedArray, KVCache]:
    """Final-norm activations of `tokens` {batch, position} at `pos_ids`; their K/V written to the cache (see
    Span)."""
    family = family_of(model)
    run_layer = _LAYERS[family.decoder]
    if family.decoder == "gpt2":
        x = model.embeddings.embed(tokens, key=None, pos_ids=pos_ids)  # learned absolute positions
        layers, final_norm = model.transformer.blocks, model.transformer.ln_f
    else:
        x = model.embeddings.embed(tokens)
        if family.scaled_embeddings:
            x = x * jnp.sqrt(model.config.hidden_dim).astype(x.dtype)
        layers, final_norm = model.transformer.layers, model.transformer.norm

    def body(layer, carry, i):
        x, cache = carry
        return run_layer(layer, x, pos_ids, cache, i.scalar() if isinstance(i, NamedArray) else i, span)

    if hasattr(layers, "blocks"):  # unrolled layers (BlockSeq: Gemma-3's, whose layers differ): a Python loop
        for i, layer in enumerate(layers.blocks):
            x, cache = run_layer(layer, x, pos_ids, cache, i, span)
    else:  # Levanter's scanned stack: the layer index comes with each layer's slice
        x, cache = layers.fold_via(body)((x, cache), hax.arange(model.config.Layers))
    return final_norm(x), cache


def _logits(model, act: NamedArray) -> jax.Array:
    """[batch, vocab] float32 logits of the last activations, the family's final soft-cap included."""
    logits = hax.dot(act, model.get_lm_head(), axis=model.Embed).rearrange(("batch", "vocab")).array
    return final_logit_softcap(model, logits.astype(jnp.float32))


# -- sampling --------------------------------------------------------------------------------------------------------


def sample(logits: jax.Array, keys: jax.Array, temperature, top_p) -> jax.Array:
    """logits [B, V] float32, keys [B, 2]; temperature 0 is greedy (argmax)."""
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / t
    # nucleus: the smallest prefix of the sorted distribution whose mass reaches top_p (at least one token)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


# -- the compiled programs -------------------------------------------------------------------------------------------
#
# Three programs: an empty cache; the prefill of a group of prompts of one length bucket, written into their cache
# rows (a batch of prompts of 10 and 1,000 tokens is not padded to 1,000 everywhere: each is prefilled at its own
# bucket, as if alone); the decoding loop over the whole batch. The cache starts just wider than the longest prompt
# and doubles (one copy) when the longest active row reaches its width, so attention reads only the slots some row
# has reached, not the context's width. It is passed from one program to the next in place (donated) and
# replicated: its batch need not divide the devices.


@functools.partial(hax.named_jit, out_axis_resources={})
def _empty_cache(model, batch: int, width: int, dtype) -> KVCache:
    return init_cache(model, batch, width, dtype)


@functools.partial(hax.named_jit, out_axis_resources={}, donate_args=(False, True, True))
def _prefill(model, cache, first_logits, rows, prompts, prompt_lens):
    """prompts {batch, position} right-padded, prompt_lens [g]: their K/V go to cache rows `rows` [g] (B: a
    padding row, dropped) and the logits after each prompt's last token to first_logits[rows] ([B, vocab])."""
    g, P = prompts.array.shape
    pos = hax.named(jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (g, P)), ("batch", "position"))
    act, cache = forward_cached(model, prompts, pos, cache, Span(rows=rows, prefill=True))
    act = act.rearrange(("batch", "position", "embed")).array
    logits = _logits(model, hax.named(act[jnp.arange(g), prompt_lens - 1], ("batch", "embed")))
    return cache, first_logits.at[rows].set(logits, mode="drop")


@functools.partial(hax.named_jit, out_axis_resources={})
def _decode(model, cache, first_logits, prompt_lens, max_new, eos_ids, temperature, top_p, row_keys, real_vocab,
            key_bounds: tuple):
    """From the prefilled cache and each row's first logits: prompt_lens, max_new [B]; eos_ids [E] (-1: none);
    row_keys [B, 2]; key_bounds (static): the cache's widths phase by phase, increasing, the first its width now,
    the last W; a phase runs while every active row's next token fits. Returns (tokens [B, W] with -1 past n, n [B],
    hit_eos [B])."""
    B = prompt_lens.shape[0]
    W = key_bounds[-1]
    vocab_ok = jnp.arange(model.Vocab.size) < real_vocab
    out = jnp.full((B, W), -1, dtype=jnp.int32)

    def pick(logits, at):
        logits = jnp.where(vocab_ok[None, :], logits, -jnp.inf)
        keys = jax.vmap(jax.random.fold_in)(row_keys, at)  # (request, position) only: not the batch
        return sample(logits, keys, temperature, top_p)

    def record(out, n, done, hit, tok, at):
        active = ~done
        out = out.at[jnp.arange(B), jnp.where(active, n, W)].set(tok, mode="drop")
        n = n + active
        is_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        hit = hit | (active & is_eos)
        done = done | (active & (is_eos | (n >= max_new) | (at + 1 >= W)))
        return out, n, done, hit

    at = prompt_lens  # where the next token goes
    tok = pick(first_logits, at)
    zeros = jnp.zeros((B,), bool)
    out, n, done, hit = record(out, jnp.zeros((B,), jnp.int32), zeros, zeros, tok, at)
    state = (cache, out, n, done, hit, tok, at)

    for bound in key_bounds:
        if state[0].k.resolve_axis("key_position").size < bound:
            state = (_grow(state[0], bound),) + state[1:]

        def cond(state, bound=bound):  # the token at `at` is written to slot `at`: every active row below the width
            done, at = state[3], state[6]
            return ~jnp.all(done) & (jnp.max(jnp.where(done, 0, at)) < bound)

        def body(state, bound=bound):
            cache, out, n, done, hit, tok, at = state
            tokens = hax.named(tok[:, None], ("batch", "position"))
            pos = hax.named(jnp.minimum(at, W - 1)[:, None], ("batch", "position"))
            act, cache = forward_cached(model, tokens, pos, cache)
            logits = _logits(model, act["position", 0])
            at = jnp.where(done, at, at + 1)
            tok = pick(logits, at)
            out, n, done, hit = record(out, n, done, hit, tok, at)
            return cache, out, n, done, hit, tok, at

        state = jax.lax.while_loop(cond, body, state)
    _, out, n, _, hit, _, _ = state
    return out, n, hit


def _bucket(n: int, low: int, high: int, *, halves: bool = False) -> int:
    """The smallest of low * 2^k (halves: and low * 1.5 * 2^k) that holds n, at most high."""
    b = low
    while True:
        if b >= n:
            return min(b, high)
        if halves and b + b // 2 >= n:
            return min(b + b // 2, high)
        b *= 2


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, max_len: int, eos_ids=(),
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, request_ids=None,
             batch_size: int | None = None, pad_id: int = 0, real_vocab: int | None = None) -> list[Generation]:
    """Decode every prompt (token ids) up to max_new_tokens or EOS. request_ids (default: positions in `prompts`)
    seed each request's sampling. Prompt lengths are bucketed to powers of two (and groups of prompts sharing a
    bucket to a power-of-two count), the batch is padded to batch_size and the cache width bucketed, so a file of
    requests compiles a handful of programs."""
    longest = max(len(p) for p in prompts)
    if longest >= max_len:
        raise ValueError(f"a prompt is {longest} tokens long; the model's rows hold {max_len}")
    B0 = len(prompts)
    B = max(B0, batch_size or B0)
    # the cache's last width: within 1.5x of what the longest answer needs (a 1,000-token prompt and 64 new tokens
    # decode over 1,536 slots, not 2,048), never less than the prefill's rows
    W = max(_bucket(longest, 16, max_len),
            _bucket(min(max_len, longest + max_new_tokens), 64, max_len, halves=True))
    bounds = [_bucket(longest + 1, 64, W)]
    while bounds[-1] < W:
        bounds.append(min(2 * bounds[-1], W))

    dtype = model.get_lm_head().dtype
    cache = _empty_cache(model, B, bounds[0], dtype)
    first = jnp.zeros((B, model.Vocab.size), jnp.float32)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(_bucket(len(p), 16, max_len), []).append(i)
    for P, rows in sorted(groups.items()):  # all of a bucket's prompts in one call (at most B of them)
        assert P <= bounds[0], (P, bounds)  # the prompts fit the cache as it starts
        g = _bucket(len(rows), 1, B)
        ids = np.full((g, P), pad_id, np.int32)
        lens = np.ones((g,), np.int32)
        where = np.full((g,), B, np.int32)  # padding rows write nowhere
        for j, i in enumerate(rows):
            ids[j, : len(prompts[i])] = prompts[i]
            lens[j] = len(prompts[i])
            where[j] = i
        cache, first = _prefill(model, cache, first, jnp.asarray(where),
                                hax.named(jnp.asarray(ids), ("batch", "position")), jnp.asarray(lens))

    lens = np.ones((B,), np.int32)
    lens[:B0] = [len(p) for p in prompts]
    max_new = np.full((B,), max_new_tokens, np.int32)
    max_new[B0:] = 1  # rows that only fill the batch stop at once
    eos = np.array(sorted(set(eos_ids)) or [-1], np.int32)
    rids = list(request_ids) if request_ids is not None else list(range(B0))
    base = jax.random.PRNGKey(seed)
    keys = jnp.stack([jax.random.fold_in(base, int(r)) for r in rids] + [base] * (B - B0))
    out, n, hit = _decode(model, cache, first, jnp.asarray(lens), jnp.asarray(max_new), jnp.asarray(eos),
                          jnp.float32(temperature), jnp.float32(top_p), keys,
                          jnp.int32(real_vocab or model.Vocab.size), tuple(bounds))
    out, n, hit = np.asarray(out), np.asarray(n), np.asarray(hit)
    return [Generation(out[i, : n[i]].tolist(), EOS if hit[i] else LENGTH) for i in range(B0)]


def generate_uncached(model, prompts: list[list[int]], *, max_new_tokens: int, max_len: int, eos_ids=(),
                      temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, request_ids=None,
                      pad_id: int = 0, real_vocab: int | None = None) -> list[Generation]:
    """The reference: every new token recomputes the whole sequence with the model's own call (no cache), one
    request at a time. Quadratic in the length; for families the cached decoder does not know, and for tests."""
    rids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
    eos = set(eos_ids)
    vocab = real_vocab or model.Vocab.size

    out = []
    for prompt, rid in zip(prompts, rids):
        width = max(len(prompt) + 1, _bucket(min(max_len, len(prompt) + max_new_tokens), 64, max_len))
        ids = np.full((width,), pad_id, np.int32)
        ids[: len(prompt)] = prompt
        n, new, finish = len(prompt), [], LENGTH
        row_key = jax.random.fold_in(jax.random.PRNGKey(seed), int(rid))
        while len(new) < max_new_tokens and n < width:
            tok = int(_uncached_step(model, hax.named(jnp.asarray(ids), model.Pos.resize(width)), jnp.int32(n),
                                     row_key, jnp.int32(vocab), jnp.float32(temperature), jnp.float32(top_p)))
            ids[n] = tok
            n += 1
            new.append(tok)
            if tok in eos:
                finish = EOS
                break
        out.append(Generation(new, finish))
    return out


@hax.named_jit
def _uncached_step(model, tokens, n, row_key, vocab, temperature, top_p):
    """The next token after the first n of `tokens`, from the model's own call over the whole row."""
    from levanter.layers.attention import AttentionMask

    from alpaca_cli.core.logits import model_logits

    logits = model_logits(model, tokens, AttentionMask.causal()).array[n - 1].astype(jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)[None, :]
    keys = jax.random.fold_in(row_key, n)[None, :]
    return sample(logits, keys, temperature, top_p)[0]
