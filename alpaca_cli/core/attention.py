"""Which attention kernel a run uses, with which block size, and whether its rows will compile with it.

Levanter picks a kernel per platform when none is set, and the pinned version's picks break packed training:
- TPU: Splash attention with 512-token blocks, so rows that are not a multiple of 512 fail at the first compile
  (`q_block_size=512 should divide q_seq_len=768`); Splash is also reported not to compile on TPU v3 in bfloat16
  (jax-ml/jax#18595, AI-Hypercomputer/maxtext#791).
- GPU: Transformer Engine when it imports, which Levanter hands a causal mask type with which TE ignores the
  segment ids: packed examples would attend to each other, silently. Without TE, Levanter's JAX flash attention with
  1024-token blocks, so `--seq-len 1536` fails (`not a multiple of 1024`).
So the choice is ours (`--attention`, `--attention-block`), made here, and checked before anything is loaded:

| platform          | auto     | block (auto): the largest that divides the row |
| ----------------- | -------- | ---------------------------------------------- |
| TPU v4 and later  | splash   | 512, 256 or 128 (rows: a multiple of 128)      |
| TPU v3            | flash    | 1024 ... 128 (rows: a multiple of 128)          |
| GPU               | flash    | 1024 ... 128 (rows: a multiple of 128); never TE |
| CPU               | flash    | 1024 ... 128, else vanilla (any row length)     |

Every kernel here honours segment ids (packed logits equal unpacked: tests/test_packing.py). A row shorter than the
flash block runs Levanter's vanilla path, which is exact too.
"""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_cli.errors import ConfigError

LANES = 128
"""Splash blocks are multiples of 128 (a TPU vector register's lanes); flash blocks here are powers of two >= 128."""
FLASH_BLOCKS = (1024, 512, 256, 128)
SPLASH_BLOCKS = (512, 256, 128)
SPLASH_TPU_V3 = "splash attention is not known to compile on TPU v3 (jax-ml/jax#18595); use --attention flash"


@dataclass(frozen=True)
class Platform:
    """What the choice depends on: cpu, gpu or tpu, and the TPU generation (3, 4, 5, ...)."""

    kind: str
    tpu_generation: int | None = None

    @property
    def name(self) -> str:
        return f"TPU v{self.tpu_generation}" if self.kind == "tpu" and self.tpu_generation else self.kind.upper()


@dataclass(frozen=True)
class AttentionChoice:
    backend: str
    """flash, splash or vanilla."""
    block: int | None
    """Block size of flash/splash (None for vanilla)."""


def platform_of(device) -> Platform:
    """The platform of a JAX device (`device_kind` is e.g. "TPU v3", "TPU v4", "TPU v5 lite", "TPU v5p")."""
    kind = device.platform
    if kind != "tpu":
        return Platform("gpu" if kind in ("gpu", "cuda", "rocm") else kind)
    digits = "".join(c for c in str(getattr(device, "device_kind", "")).split("v", 1)[-1] if c.isdigit())[:1]
    return Platform("tpu", int(digits) if digits else None)


def choose(requested: str, block: int | None, seq_len: int, platform: Platform) -> AttentionChoice:
    """The kernel and block size for rows of seq_len on the platform; ConfigError (naming the nearest row lengths
    that work) when the rows would not compile with what was asked."""
    backend = requested
    if requested == "auto":
        if platform.kind == "tpu" and (platform.tpu_generation or 4) >= 4:
            backend = "splash"
        elif platform.kind == "cpu" and seq_len % LANES:
            backend = "vanilla"  # any length on CPU
        else:
            backend = "flash"
    if backend == "vanilla":
        if block is not None:
            raise ConfigError("--attention-block applies to flash and splash attention, not vanilla")
        return AttentionChoice("vanilla", None)
    if backend == "splash":
        if platform.kind != "tpu":
            raise ConfigError(f"--attention splash runs on TPU only (this plan is for {platform.name}); "
                              "use --attention auto or flash")
        if platform.tpu_generation == 3:
            raise ConfigError(SPLASH_TPU_V3)
    sizes = SPLASH_BLOCKS if backend == "splash" else FLASH_BLOCKS
    what = f"{backend} attention on {platform.name}"
    if block is not None:
        if block % LANES or (backend == "flash" and block & (block - 1)):
            need = "a multiple of 128" if backend == "splash" else "a power of two of at least 128"
            raise ConfigError(f"--attention-block {block}: {backend} blocks must be {need}")
        # Levanter clips the block to the row, so a row shorter than the block is one block
        if seq_len % min(block, seq_len) or seq_len % LANES:
            raise ConfigError(
                f"--seq-len {seq_len} does not compile with {what} and {block}-token blocks (rows must be a "
                f"multiple of the block); nearest lengths that work: {nearest_lengths(seq_len, block)}",
                hint=f"or --attention-block {largest_dividing(seq_len, sizes) or 'N'}",
            )
        return AttentionChoice(backend, block)
    chosen = largest_dividing(seq_len, sizes)
    if chosen is None:
        raise ConfigError(
            f"--seq-len {seq_len} does not compile with {what} (rows must be a multiple of {LANES}); "
            f"nearest lengths that work: {nearest_lengths(seq_len, LANES)}",
            hint="or --attention vanilla (memory grows with the square of the row)" if backend == "flash" else None,
        )
    return AttentionChoice(backend, chosen)


def largest_dividing(seq_len: int, sizes: tuple[int, ...]) -> int | None:
    for b in sizes:
        if seq_len % b == 0:
            return b
    return None


def nearest_lengths(seq_len: int, multiple: int) -> str:
    low = (seq_len // multiple) * multiple
    options = [x for x in (low, low + multiple) if x > 0 and x != seq_len]
    return " or ".join(str(x) for x in options)


def levanter_fields(choice: AttentionChoice, remat: bool, config) -> dict:
    """The fields of Levanter model config `config` that carry the choice: only those this config class has."""
    import dataclasses

    from levanter.layers.attention import AttentionBackend

    backend = {"flash": AttentionBackend.JAX_FLASH, "splash": AttentionBackend.SPLASH,
               "vanilla": AttentionBackend.VANILLA}[choice.backend]
    # some configs (OLMo-2, Gemma, GPT-2) also carry use_flash_attention, which Levanter checks against the backend
    wanted = {"attn_backend": backend, "flash_attention_block_size": choice.block, "gradient_checkpointing": remat,
              "use_flash_attention": choice.backend != "vanilla"}
    fields = {f.name for f in dataclasses.fields(config)}
    return {k: v for k, v in wanted.items() if k in fields}
