"""`TinyLlama`: a small Llama-architecture causal language model in plain PyTorch.

Same structure and parameter names as Hugging Face's Llama (so `prepare()` finds the same
`q_proj … down_proj` linears): token embedding → N × [RMSNorm → grouped-query attention with
rotary position embeddings → residual; RMSNorm → SwiGLU MLP → residual] → RMSNorm → `lm_head`.

There is no pretrained checkpoint: `TinyLlama.from_seed` initialises the weights deterministically
from a seed (on the CPU, so every device gets the same model).

Inference with a static key/value cache (`KVCache`, `TinyLlama.forward_cached`) serves
`qlora_ext.generate`: every tensor has a shape fixed by (batch, cache length), so one decode step
can be captured in a CUDA graph and replayed.

Shapes: B batch, T sequence, D hidden, H query heads, G key/value heads, Dh = D / H head size,
L cache length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpointing import checkpoint


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 259
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    model_type: str = "tiny_llama"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the head size (hidden_size / num_attention_heads) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x²) + eps) * weight, all in fp32, rounded once to x's dtype. (transformers'
    LlamaRMSNorm rounds the normalised x to its dtype first and multiplies by the weight in that
    dtype: `qlora_ext.block_ops.rms_norm` does either, by its cast_before_weight flag.)"""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim], the two halves of each row repeated (rotate-half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [max_len, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, Dh]; cos, sin: [T, Dh] (positions 0..T-1 of every row) or [B, 1, T, Dh]
    (each row's own positions). Rotates each (i, i + Dh/2) pair by its angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True where query i may attend to key j: j ≤ i and both in the same packed
    example. An example starts wherever a position does not follow on from the previous token's
    (the rule transformers uses for packed rows too)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    segment = starts.cumsum(dim=1)  # [B, T]
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_proj(x), k_proj(x), v_proj(x); a method so that one instance can compute the three in
        one unit (qlora_ext.fused_qkv) without touching the class."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """RoPE of q [B, H, T, Dh] and k [B, G, T, Dh]; a method so that one instance can swap in
        a fused kernel (qlora_ext.fused_blocks) without touching the class."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerCache | None = None, cache_position: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over x [B, T, D]. `mask` (bool, True where a query may attend):
        [B, 1, T, T] for packed rows, or [B, 1, T, L] over the L cache slots; None: plain causal.
        With `cache`, the keys/values of x are first written to its slots `cache_position` [T]
        and the queries attend to all L slots."""
        B, T, _ = x.shape
        q, k, v = self.projections(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, G, T, Dh]
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, G, T, Dh]
        q, k = self.rotate(q, k, cos, sin)
        if cache is not None:
            cache.keys.index_copy_(2, cache_position, k)
            cache.values.index_copy_(2, cache_position, v)
            k, v = cache.keys, cache.values  # [B, G, L, Dh]
        # Each group of H/G query heads shares one key/value head.
        repeat = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, Dh]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerCache | None = None, cache_position: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class LayerCache:
    """One layer's static keys and values [B, G, L, Dh]."""

    keys: torch.Tensor
    values: torch.Tensor


class KVCache:
    """A static key/value cache of L slots per row for every layer of a TinyLlama.

    Slots are written in place (`index_copy_`), so the tensors keep their addresses for the whole
    generation, as a CUDA graph of a decode step needs.
    """

    def __init__(self, config: TinyLlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.layers = [
            LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        self.max_len = max_len


class LlamaBody(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.model`)."""

    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)


class TinyLlama(nn.Module):
    supports_gradient_checkpointing = True

    def __init__(self, config: TinyLlamaConfig | None = None):
        super().__init__()
        self.config = config or TinyLlamaConfig()
        self.name_or_path = "qlora_ext/builtin/tiny_llama"
        self.model = LlamaBody(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    @classmethod
    def from_seed(cls, config: TinyLlamaConfig | None = None, seed: int = 0) -> "TinyLlama":
        """A model whose weights depend only on `config` and `seed` (drawn on the CPU)."""
        model = cls(config)
        model.init_weights(seed)
        return model

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Unit-variance embeddings; linears with std 1/sqrt(fan_in), residual outputs scaled by
        1/sqrt(2 * layers) so the residual stream keeps its scale; norms at 1."""
        gen = torch.Generator().manual_seed(seed)
        residual_scale = 1.0 / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 1.0 / math.sqrt(module.in_features)
                if name.endswith(("o_proj", "down_proj")):
                    std *= residual_scale
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    # Hugging Face-style switches, so code written for transformers models works here too.
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """input_ids, labels: [B, T] int64 (labels -100 where no loss). Returns (loss, logits [B, T, V]);
        loss is the mean cross-entropy of predicting token t+1 from tokens ≤ t, None without labels.

        position_ids [B, T] (optional) holds packed rows: several examples back to back, each
        starting again at position 0; attention then stays inside each example."""
        T = input_ids.shape[1]
        body = self.model
        if position_ids is None:
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            cos, sin, mask = body.rope_cos[:T], body.rope_sin[:T], None
        else:
            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, input_ids {tuple(input_ids.shape)}")
            if position_ids.numel() and not 0 <= int(position_ids.min()) <= int(position_ids.max()) < self.config.max_position_embeddings:
                raise ValueError(f"position_ids must lie in [0, {self.config.max_position_embeddings})")
            cos, sin = body.rope_cos[position_ids].unsqueeze(1), body.rope_sin[position_ids].unsqueeze(1)
            mask = packed_causal_mask(position_ids)
        x = body.embed_tokens(input_ids)  # [B, T, D]
        for layer in body.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each layer's input; recompute its activations during backward (one
                # autograd node per layer, qlora_ext.checkpointing).
                x = checkpoint(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask)
        logits = self.lm_head(body.norm(x))  # [B, T, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return loss, logits

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty static cache for `batch` rows of up to `max_len` tokens, in the dtype and on the
        device of the token embedding (the dtype of the hidden states)."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings={self.config.max_position_embeddings}")
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, weight.dtype, weight.device)

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        cache_position: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Inference with a static cache: the logits of the last position [B, V].

        input_ids, position_ids: [B, T] (each row's own positions, e.g. after left padding);
        cache_position: [T] int64, the cache slots the T tokens are written to; attention_mask:
        [B, 1, T, L] bool, True where a query may attend to a slot (causality and padding are the
        caller's). Reads no tensor value on the host: capturable in a CUDA graph.
        """
        body = self.model
        cos = body.rope_cos[position_ids].unsqueeze(1)  # [B, 1, T, Dh]
        sin = body.rope_sin[position_ids].unsqueeze(1)
        x = body.embed_tokens(input_ids)  # [B, T, D]
        for layer, layer_cache in zip(body.layers, cache.layers):
            x = layer(x, cos, sin, attention_mask, layer_cache, cache_position)
        return self.lm_head(body.norm(x[:, -1]))  # [B, V]
