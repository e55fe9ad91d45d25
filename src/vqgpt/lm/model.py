"""The stage-two GPT-2: its config and presets, building / resizing it for the joint vocabulary,
its FLOP count (the loss is `vqgpt.lm.loss`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from vqgpt.config import ConfigError
from vqgpt.lm.loss import LOSS_MODES
from vqgpt.lm.positions import ImagePositions, forward_position_ids

GPT2_EOS_ID = 50256  # <|endoftext|>: BOS and EOS of every sequence

LM_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=128),  # tests
    "mini": dict(n_layer=4, n_head=4, n_embd=256),  # the CPU demo
    "small": dict(n_layer=12, n_head=12, n_embd=768),  # GPT-2 small (124M)
    "medium": dict(n_layer=24, n_head=16, n_embd=1024),  # GPT-2 medium (350M)
}
IMAGE_EMBEDDING_INITS = ("random", "codebook")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

# Dense bf16 tensor-core peak per GPU (vendor datasheets), matched against the CUDA device name.
# More specific names come first: "H100 PCIe" before "H100", "L40S" before "L4".
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
)


# ---------------------------------------------------------------------------------------------
# config


class Architecture(NamedTuple):
    """Resolved transformer shape: preset values with the explicit overrides on top."""

    n_layer: int
    n_head: int
    n_embd: int


@dataclass
class LMConfig:
    """Stage-two language model options (the `model:` section of an lm config)."""

    preset: str = "tiny"  # "tiny" | "mini" | "small" | "medium"; ignored when `pretrained` is set
    pretrained: str | None = None  # Hub name or local folder of a GPT-2 to start from
    n_layer: int | None = None  # override the preset
    n_head: int | None = None
    n_embd: int | None = None
    n_positions: int | None = None  # default: the longest sequence the caller needs
    dropout: float = 0.0  # embedding, attention and residual dropout
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False  # recompute each block in the backward: less memory
    pad_vocab_to: int = 64  # embedding rows rounded up to a multiple of this (tensor cores)
    loss: str = "split"  # "split": image targets over image rows, others over text rows | "full"
    # the image ids' embedding rows at the start: "random" (GPT-2's N(0, 0.02)) or "codebook" (the
    # tokenizer's code vectors, rotated into the model width: `init_image_embeddings`). Measured
    # worse on shapes (demo LM one-draw t2i 59.5% against 78.0%: docs/results.md, issue 14)
    image_embedding_init: str = "random"

    def __post_init__(self) -> None:
        if self.preset not in LM_PRESETS:
            raise ConfigError(f"model.preset {self.preset!r} is unknown; known: {list(LM_PRESETS)}")
        overrides = [k for k in ("n_layer", "n_head", "n_embd") if getattr(self, k) is not None]
        if self.pretrained is not None and overrides:
            raise ConfigError(
                f"model.{overrides[0]} cannot be combined with model.pretrained: the architecture of "
                f"a pretrained model comes from its checkpoint; remove model.{overrides[0]}"
            )
        for key in ("n_layer", "n_head", "n_embd", "n_positions"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"model.{key} must be a positive integer or null, got {value}")
        arch = self.architecture
        if arch.n_embd % arch.n_head != 0:
            raise ConfigError(
                f"model.n_embd ({arch.n_embd}) must be divisible by model.n_head ({arch.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.attn_implementation {self.attn_implementation!r} is unknown; "
                f"known: {list(ATTN_IMPLEMENTATIONS)}"
            )
        if self.pad_vocab_to < 1:
            raise ConfigError(f"model.pad_vocab_to must be at least 1, got {self.pad_vocab_to}")
        if self.loss not in LOSS_MODES:
            raise ConfigError(f"model.loss must be one of {list(LOSS_MODES)}, got {self.loss!r}")
        if self.image_embedding_init not in IMAGE_EMBEDDING_INITS:
            raise ConfigError(
                f"model.image_embedding_init must be one of {list(IMAGE_EMBEDDING_INITS)}, got "
                f"{self.image_embedding_init!r}"
            )

    @property
    def architecture(self) -> Architecture:
        """The preset's layer / head / width counts with explicit overrides on top."""
        preset = LM_PRESETS[self.preset]
        return Architecture(
            *(getattr(self, k) or preset[k] for k in ("n_layer", "n_head", "n_embd"))
        )


# ---------------------------------------------------------------------------------------------
# building and resizing


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def get_real_vocab_size(config: GPT2Config) -> int:
    """Rows of the embedding that are real tokens (the rest is padding, never sampled)."""
    return getattr(config, "real_vocab_size", None) or config.vocab_size


def build_lm(cfg: LMConfig, vocab_size: int, n_positions: int) -> GPT2LMHeadModel:
    """A GPT-2 for a joint vocabulary of `vocab_size` ids and sequences up to `n_positions`."""
    if cfg.n_positions is not None and cfg.n_positions < n_positions:
        raise ConfigError(
            f"model.n_positions={cfg.n_positions} is shorter than the longest training sequence "
            f"({n_positions} tokens); raise it or leave it null"
        )
    n_positions = cfg.n_positions or n_positions
    dropouts = dict(resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    if cfg.pretrained is None:
        arch = cfg.architecture
        config = GPT2Config(
            vocab_size=round_up(vocab_size, cfg.pad_vocab_to),
            n_positions=n_positions,
            n_layer=arch.n_layer,
            n_head=arch.n_head,
            n_embd=arch.n_embd,
            bos_token_id=GPT2_EOS_ID,
            eos_token_id=GPT2_EOS_ID,
            tie_word_embeddings=True,
            attn_implementation=cfg.attn_implementation,
            **dropouts,
        )
        model = GPT2LMHeadModel(config)
        model.config.real_vocab_size = vocab_size
    else:
        try:
            model = GPT2LMHeadModel.from_pretrained(
                cfg.pretrained,
                attn_implementation=cfg.attn_implementation,
                dtype=torch.float32,  # fp32 master weights; autocast does the rest
                **dropouts,
            )
        except OSError as err:
            raise ConfigError(
                f"model.pretrained={cfg.pretrained!r}: could not load a GPT-2 from it ({err}). "
                "Give a local folder written by save_pretrained (or a Hub name when online), "
                "or set model.pretrained to null to start from model.preset"
            ) from err
        extend_positions(model, n_positions)
        resize_for_vocab(model, vocab_size, pad_to=cfg.pad_vocab_to)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False  # a cache is useless while training and clashes with it
    return model


@torch.no_grad()
def init_image_embeddings(
    model: GPT2LMHeadModel, code_vectors: Tensor, image_offset: int, seed: int = 0
) -> None:
    """Set the embedding rows of image ids [image_offset, image_offset + K) from the tokenizer's
    code vectors `code_vectors` [K, D] (what its decoder reads for each id), so that the LM starts
    with codes that draw alike near each other; the output head is tied to them.

    Rows = (v - mean(v)) @ P, scaled to GPT-2's init std (`initializer_range`, 0.02), with P a
    seeded random [D, C] matrix of orthonormal rows when D <= C (inner products of centred codes
    kept exactly, up to the scale) or orthonormal columns when D > C (a random projection). Our
    own option, not from a paper; measured worse than the random rows on shapes (docs/results.md,
    issue 14's twelfth run: the demo LM's one-draw text-to-image 78.0% -> 59.5% with CFG 1.5).
    Text rows untouched.

    Raises ValueError when the ids do not fit the embedding or `code_vectors` is not [K, D].
    """
    if code_vectors.ndim != 2:
        raise ValueError(f"code_vectors must be [K, D], got {tuple(code_vectors.shape)}")
    k, d = code_vectors.shape
    emb = model.get_input_embeddings().weight  # (Vpad, C)
    if image_offset < 0 or image_offset + k > emb.shape[0]:
        raise ValueError(
            f"image ids [{image_offset}, {image_offset + k}) do not fit the embedding's "
            f"{emb.shape[0]} rows"
        )
    c = emb.shape[1]
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(d, c), min(d, c), generator=g, dtype=torch.float64))
    proj = q.T if d <= c else q  # (D, C): orthonormal rows, or columns
    x = code_vectors.detach().double().cpu()
    rows = (x - x.mean(0)) @ proj  # (K, C)
    rows *= model.config.initializer_range / rows.std().clamp_min(1e-12)
    emb[image_offset : image_offset + k] = rows.to(emb.dtype).to(emb.device)


def _sample_like(rows: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """`count` draws from N(mean, cov) of `rows` [n, C] (cov clamped to PSD); [count, C]."""
    x = rows.detach().float()
    mean = x.mean(0)  # (C,)
    centered = x - mean
    cov = (centered.T @ centered / x.shape[0]).double()  # (C, C)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # robust where cov is singular (n <= C)
    device = generator.device if generator is not None else cov.device
    z = torch.randn(count, x.shape[1], generator=generator, dtype=torch.float64, device=device)
    z = z.to(cov.device) * eigvals.clamp_min(0).sqrt()  # (count, C) in the eigenbasis
    return (mean.double() + z @ eigvecs.T).to(rows.dtype)


def _resized_rows(
    old: Tensor, n_keep: int, n_rows: int, generator: torch.Generator | None
) -> nn.Parameter:
    """`old[:n_keep]` unchanged, then rows drawn like them up to `n_rows`."""
    new = torch.empty(n_rows, old.shape[1], dtype=old.dtype, device=old.device)
    with torch.no_grad():
        new[:n_keep] = old[:n_keep]
        new[n_keep:] = _sample_like(old[:n_keep], n_rows - n_keep, generator)
    return nn.Parameter(new, requires_grad=old.requires_grad)


def resize_for_vocab(
    model: GPT2LMHeadModel,
    vocab_size: int,
    pad_to: int = 64,
    *,
    generator: torch.Generator | None = None,
) -> GPT2LMHeadModel:
    """Grow the embedding (and lm_head) to `vocab_size` real rows, padded to a multiple of `pad_to`.

    The model's existing real rows stay bit-identical; every other row is drawn from a multivariate
    normal with the mean and covariance of the real rows. Hugging Face's
    `resize_token_embeddings(mean_resizing=True)` draws from N(mean, 1e-9 * cov), i.e. all new rows
    at the mean; we draw with the full covariance so new tokens start as typical, distinct
    embeddings (and so that old padding rows, which never trained, are not kept as real ones).
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    n_old = min(get_real_vocab_size(model.config), emb.weight.shape[0])
    if vocab_size < n_old:
        raise ValueError(
            f"the model already has {n_old} real tokens; a vocabulary of {vocab_size} would drop "
            "trained rows. Build the vocabulary the model was trained with (or a larger one)"
        )
    n_rows = round_up(vocab_size, pad_to)
    if (n_old, emb.weight.shape[0]) == (vocab_size, n_rows):  # already this layout: no-op
        model.config.real_vocab_size = vocab_size
        return model
    tied = head is not None and head.weight is emb.weight
    emb.weight = _resized_rows(emb.weight, n_old, n_rows, generator)
    emb.num_embeddings = n_rows
    if head is not None:
        if head.bias is not None:
            raise ValueError("resize_for_vocab expects an lm_head without bias (as GPT-2 has)")
        head.weight = emb.weight if tied else _resized_rows(head.weight, n_old, n_rows, generator)
        head.out_features = n_rows
    model.config.vocab_size = n_rows
    model.config.real_vocab_size = vocab_size
    return model


def extend_positions(model: GPT2LMHeadModel, n_positions: int) -> GPT2LMHeadModel:
    """Grow the learned position table `wpe` to `n_positions` rows (never shrinks it).

    Old rows stay bit-identical; new row i copies old row i mod n_old (Longformer's "copy"
    initialisation, Beltagy et al. 2020: it keeps the local structure attention relies on and
    fine-tunes faster than random rows).
    """
    wpe = model.transformer.wpe
    n_old = wpe.weight.shape[0]
    if n_positions <= n_old:
        return model
    index = torch.arange(n_positions, device=wpe.weight.device) % n_old
    with torch.no_grad():
        new = wpe.weight[index].clone()
    wpe.weight = nn.Parameter(new, requires_grad=wpe.weight.requires_grad)
    wpe.num_embeddings = n_positions
    model.config.n_positions = n_positions
    return model


def hidden_matrices(model: GPT2LMHeadModel) -> list[nn.Parameter]:
    """The 2-D weights of the transformer blocks (attention's c_attn and c_proj, the MLP's c_fc
    and c_proj; `len(model.transformer.h) * 4` of them): what `train.optimizer=muon` trains with
    Muon. Embeddings, the tied output head, norms and biases are not among them."""
    return [p for p in model.transformer.h.parameters() if p.ndim == 2 and p.requires_grad]


def forward_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """Final hidden states [B, T, C] (after ln_f) for `lm_loss`, without full [B, T, V] logits.

    Goes through the model's own forward (so DDP / Accelerate wrappers and their hooks run) and
    asks for the last position's logits only.
    """
    if attention_mask is None:  # never None with position ids: see lm.positions
        attention_mask = torch.ones_like(input_ids)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=forward_position_ids(
            input_ids, attention_mask, ImagePositions.of_model(model)
        ),
        logits_to_keep=1,
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1]


# ---------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(config: GPT2Config, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12*L*C*T (PaLM appendix B; nanoGPT's estimate_mfu).

    N counts every parameter that takes part in a matmul or norm: the blocks, ln_f and the
    (tied) lm_head once; the position table is a lookup and is left out.
    """
    n_layer, n_embd = config.n_layer, config.n_embd
    n_inner = config.n_inner or 4 * n_embd
    norms = 2 * 2 * n_embd  # ln_1, ln_2: weight + bias
    attn = (n_embd + 1) * 3 * n_embd + (n_embd + 1) * n_embd  # c_attn, c_proj (+ biases)
    mlp = (n_embd + 1) * n_inner + (n_inner + 1) * n_embd  # c_fc, c_proj (+ biases)
    per_layer = norms + attn + mlp
    n_params = n_layer * per_layer + 2 * n_embd + config.vocab_size * n_embd
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def peak_flops(device: torch.device | str, override: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` for MFU; `override` wins; None when unknown (CPU)."""
    if override is not None:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


__all__ = [
    "IMAGE_EMBEDDING_INITS",
    "LM_PRESETS",
    "Architecture",
    "LMConfig",
    "build_lm",
    "extend_positions",
    "flops_per_token",
    "forward_hidden",
    "get_real_vocab_size",
    "hidden_matrices",
    "init_image_embeddings",
    "peak_flops",
    "resize_for_vocab",
    "round_up",
]
