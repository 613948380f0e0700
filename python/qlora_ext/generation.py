"""`generate`: autoregressive decoding with a static KV cache and, on CUDA, CUDA graphs.

    tokens = qlora_ext.generate(model, input_ids, max_new_tokens=256, eos_token_id=tok.eos_token_id)

Works on transformers causal LMs (prepared with `qlora_ext.prepare` or not; adapters active,
merged into the NF4 base with `QLoRALinear.merge()`, or disabled) and on the built-in TinyLlama.

How a call runs:
1. prefill: one forward over the prompt writes its keys/values into a static cache of
   L = prompt + max_new_tokens slots per row (transformers' `StaticCache`, or TinyLlama's
   `KVCache`) and yields the logits of the first new token;
2. decode: one forward per token. Its inputs live in fixed buffers updated in place (the token
   [B, 1], each row's position [B, 1], the cache slot [1]) and the attention mask over the L slots
   is computed on the device from them, so every step launches the same kernels on the same
   addresses. On CUDA the step is captured once in a CUDA graph (after warm-up steps run on a
   side stream, as PyTorch's recipe asks) and replayed: a 32-layer model launches ~1000 kernels a
   token, whose launch cost alone would exceed the GPU time of a 4-bit decode step.
   The token choice (argmax or sampling) runs eagerly between replays, so sampling uses the
   ordinary RNG; it never waits for the GPU (the host checks "all rows finished" only every
   `EOS_CHECK_INTERVAL` steps on CUDA).

Padding: rows of different lengths are left-padded, with `attention_mask` marking the real tokens
(1) and the padding (0), as transformers does. Each row's positions count its real tokens only,
so a row generates the same tokens in a padded batch as alone (up to floating-point rounding of
the longer masked attention sum).

Decode-sized inputs reach the NF4 layers as <= 16 rows, which take the fused `nf4_gemv`
(`_ops.gemv_route`); everything on that path reads no tensor value on the host and allocates
nothing whose size changes between steps, which is what graph capture requires.
"""

from __future__ import annotations

import inspect
import math
import time
import types
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._ops import programmatic_launch
from .lora_linear import cast_adapters_once

#: Eager decode steps (on a side stream) before the capture: lazy initialisation (cuBLAS handles and
#: workspaces, kernel modules, the caching allocator's blocks) must happen outside the capture.
GRAPH_WARMUP_STEPS = 2
#: On CUDA, decode steps between checks that every row has finished; each check waits for the GPU.
EOS_CHECK_INTERVAL = 16
#: transformers attention implementations whose mask generate builds (a 4-D mask over the cache).
HF_ATTENTION = ("sdpa", "eager")
#: With "sdpa", pass the 4-D mask as an additive float mask (0 / -inf in the model's dtype) built
#: once a step; False: as bool, which SDPA converts to that float mask in every layer (three small
#: kernels a layer and step). The results are the same either way.
ADDITIVE_SDPA_MASK = True
#: Decode with programmatic dependent launch (sm_90+; `_ops.programmatic_launch`): each fused
#: kernel of a step starts under the end of the one before and loads its weights there.
PROGRAMMATIC_LAUNCH = True


def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    cuda_graphs: bool | str = "auto",
    seed: int | None = None,
    stats: dict | None = None,
) -> Tensor:
    """Generate up to `max_new_tokens` tokens after each row of `input_ids`.

    model: a transformers causal LM (any with a `StaticCache`-compatible attention: Llama,
        Mistral, Qwen2, ... with attn_implementation "sdpa" or "eager"), or qlora_ext's TinyLlama.
        Runs in eval mode (restored afterwards) and without autograd.
    input_ids: [B, T] integer token ids, on the model's device.
    attention_mask: [B, T], 1 for real tokens and 0 for padding; padding must be on the left.
        None: no padding.
    do_sample: False picks the most likely token (greedy); True samples from the softmax of the
        logits / `temperature`, restricted to the `top_k` most likely tokens (0: all) and to the
        smallest set whose probability reaches `top_p` (1.0: all).
    eos_token_id: a token id, or several, that end a row. A finished row gets `pad_token_id`
        (default: the first eos id) from then on; generation stops once every row has finished,
        and the result is cut after the last step that produced a real token. None: no stop token
        (the model's generation_config is not consulted, unlike transformers' generate).
    cuda_graphs: "auto" captures the decode step in a CUDA graph on CUDA (never on the CPU) and
        falls back to eager steps, with a warning, if the capture fails; True insists (an error if
        the capture fails, or on the CPU); False always runs eagerly.
    seed: seeds a private generator for sampling (reproducible, leaves the global RNG alone);
        None samples from the global generator.
    stats: if a dict is given, it is filled with timings (seconds, measured with device
        synchronisation): prefill_s, capture_s, decode_s (decode steps, capture excluded),
        decode_steps, new_tokens, cuda_graphs (whether the graph ran), decode_tokens_per_s.

    Returns [B, T + n] int64 on the input's device: the prompts followed by the n <= max_new_tokens
    new tokens.
    """
    _check_arguments(model, input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p,
                     cuda_graphs, seed)  # fmt: skip
    decoder_type = _decoder_type(model)
    device = input_ids.device
    eos_ids = _token_ids(eos_token_id, "eos_token_id")
    if pad_token_id is not None and (not _is_int(pad_token_id) or pad_token_id < 0):
        raise ValueError(f"pad_token_id must be a token id (int >= 0) or None, got {pad_token_id!r}")
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    use_graphs = cuda_graphs is True or (cuda_graphs == "auto" and device.type == "cuda")
    if use_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model and input_ids on a CUDA device, got {device}")

    input_ids = input_ids.long()
    batch, prompt_len = input_ids.shape
    total_len = prompt_len + max_new_tokens
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        attention_mask = _check_left_padding(attention_mask, input_ids)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    timer = _Timer(stats is not None, device)
    try:
        pdl = programmatic_launch(PROGRAMMATIC_LAUNCH and device.type == "cuda")
        with torch.inference_mode(), cast_adapters_once(), pdl:
            decoder = decoder_type(model, batch, total_len, device)
            out = _decode(decoder, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                          eos, pad, use_graphs, cuda_graphs is True, generator, timer)  # fmt: skip
    finally:
        for module, mode in modes.items():
            module.train(mode)
    if stats is not None:
        stats.update(timer.report(out.shape[1] - prompt_len))
    return out


# ---- the decoding loop -------------------------------------------------------------------------


def _decode(decoder, input_ids, prompt_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad,
            use_graphs, strict_graphs, generator, timer) -> Tensor:  # fmt: skip
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    total_len = prompt_len + max_new_tokens

    # Static inputs of every forward: which cache slots may be attended to (padding off, the
    # not-yet-written slots are excluded by causality), and the step's token, positions and slot.
    slot_mask = torch.ones(batch, total_len, dtype=torch.bool, device=device)  # [B, L]
    slot_mask[:, :prompt_len] = prompt_mask
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp_(min=0)  # [B, T]: real tokens count from 0
    token = torch.empty(batch, 1, dtype=torch.long, device=device)
    position = positions[:, -1:] + 1  # [B, 1]; the last prompt token is real (left padding)
    slot = torch.full((1,), prompt_len, dtype=torch.long, device=device)

    out = torch.full((batch, total_len), pad, dtype=torch.long, device=device)
    out[:, :prompt_len] = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    logits = decoder.forward(input_ids, positions, torch.arange(prompt_len, device=device), slot_mask)
    timer.mark("prefill")
    runner = _StepRunner(lambda: decoder.forward(token, position, slot, slot_mask), use_graphs, strict_graphs, timer)
    steps = max_new_tokens
    for i in range(max_new_tokens):
        chosen = _choose(logits, do_sample, temperature, top_k, top_p, generator)  # [B]
        if eos is None:
            out[:, prompt_len + i] = chosen
        else:
            out[:, prompt_len + i] = torch.where(finished, pad, chosen)
            finished |= torch.isin(chosen, eos)
        if i + 1 == max_new_tokens:
            break
        if eos is not None and (device.type != "cuda" or (i + 1) % EOS_CHECK_INTERVAL == 0) and bool(finished.all()):
            steps = i + 1
            break
        # A finished row keeps decoding its own (ignored) choice: always a valid id, unlike pad.
        token.copy_(chosen.unsqueeze(1))
        logits = runner()
        position.add_(1)
        slot.add_(1)
    timer.mark("decode", steps=runner.steps)
    if eos is not None:
        steps = _last_useful_step(out[:, prompt_len : prompt_len + steps], finished, eos)
    return out[:, : prompt_len + steps]


def _last_useful_step(new_tokens: Tensor, finished: Tensor, eos: Tensor) -> int:
    """Columns of `new_tokens` [B, n] up to the step where the last row finished (all n when some
    row never did): a row's tokens after its eos are padding, as are steps where all had ended."""
    if not bool(finished.all()):
        return new_tokens.shape[1]
    first_eos = torch.isin(new_tokens, eos).int().argmax(dim=1)  # [B]; every row has one
    return int(first_eos.max()) + 1


def _argmax_rows(x: Tensor, two_pass: bool | None = None) -> Tensor:
    """x.argmax(dim=-1) of [B, V]; on CUDA, for a vocabulary-sized row, in two passes: the max of
    each of C chunks (C a divisor of V), then the first chunk holding the overall max. The same
    index (the first maximal one; NaN counts as the max in both). Why: PyTorch's argmax of one
    128K-logit row took 28 us on the H100 (one CTA reduces it), once per generated token; the two
    passes spread it over the GPU (not yet timed on one: written 2026-12-06 without a GPU).
    two_pass: None (on CUDA for V >= 32768), or forced (tests)."""
    B, V = x.shape
    if two_pass is None:
        two_pass = x.is_cuda and V >= 32768
    chunks = next((c for c in (256, 384, 512, 320, 192, 128, 64, 10, 4) if V % c == 0), None) if two_pass else None
    if chunks is None:
        return x.argmax(dim=-1)
    width = V // chunks
    best, where = x.view(B, chunks, width).max(dim=-1)  # [B, chunks]: each chunk's first max
    chunk = best.argmax(dim=-1, keepdim=True)  # [B, 1]: the first chunk holding the overall max
    return (where.gather(-1, chunk) + chunk * width).squeeze(-1)


def _choose(logits: Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator) -> Tensor:
    """The next token of each row [B] from fp32 logits [B, V]."""
    if not do_sample:
        return _argmax_rows(logits)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        # Keep the most likely tokens until their probability reaches top_p (always the first).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before each token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    probs = logits.softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws index i with probability p_i, like
    # torch.multinomial, without its host synchronisation. (E is kept > 0: 0 / 0 would be NaN,
    # which argmax would pick.)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return _argmax_rows(probs / race)


class _StepRunner:
    """Runs the decode step `step` (a closure over static buffers only): eagerly, or on CUDA by
    GRAPH_WARMUP_STEPS eager steps on a side stream, one capture, and graph replays after."""

    def __init__(self, step, use_graph: bool, strict: bool, timer: _Timer):
        self.step, self.use_graph, self.strict, self.timer = step, use_graph, strict, timer
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Tensor | None = None
        self.warmups = 0
        self.steps = 0

    def __call__(self) -> Tensor:
        self.steps += 1
        if self.graph is not None:
            self.graph.replay()
            return self.output  # overwritten by the next replay; the caller consumes it first
        if not self.use_graph:
            return self.step()
        if self.warmups < GRAPH_WARMUP_STEPS:
            self.warmups += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.step()
            torch.cuda.current_stream().wait_stream(side)
            return logits
        return self._capture_and_replay()

    def _capture_and_replay(self) -> Tensor:
        # Capturing records kernels without running them: the cache and the in-place counters are
        # untouched until the replay below runs this very step.
        self.timer.start_capture()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.step()
        except Exception as exc:
            self.timer.end_capture(succeeded=False)
            if self.strict:
                raise RuntimeError(f"capturing the decode step in a CUDA graph failed: {exc}") from exc
            warnings.warn(
                f"qlora_ext.generate: capturing the decode step in a CUDA graph failed "
                f"({type(exc).__name__}: {exc}); decoding eagerly (slower). Pass cuda_graphs=False to skip "
                f"the attempt.",
                RuntimeWarning,
                stacklevel=5,
            )
            self.use_graph = False
            torch.cuda.synchronize()
            return self.step()
        self.timer.end_capture()
        self.graph, self.output = graph, output
        graph.replay()
        return output


class _Timer:
    """Phase timings for `stats` (device-synchronised); does nothing when stats are not wanted."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.start = self.last = self._now() if enabled else 0.0
        self.times = {"prefill_s": 0.0, "capture_s": 0.0, "decode_s": 0.0}
        self.decode_steps = 0
        self.graphed = False
        self._capture_start = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, phase: str, steps: int = 0) -> None:
        if not self.enabled:
            return
        now = self._now()
        self.times[f"{phase}_s"] += now - self.last
        self.last = now
        self.decode_steps += steps

    def start_capture(self) -> None:
        if self.enabled:
            self._capture_start = self._now()

    def end_capture(self, succeeded: bool = True) -> None:
        self.graphed = succeeded
        if self.enabled:
            now = self._now()
            self.times["capture_s"] += now - self._capture_start
            self.times["decode_s"] -= now - self._capture_start  # decode_s is taken over the capture too

    def report(self, new_tokens: int) -> dict:
        decode_s = self.times["decode_s"]
        return {
            **self.times,
            "decode_steps": self.decode_steps,
            "new_tokens": new_tokens,
            "cuda_graphs": self.graphed,
            "decode_tokens_per_s": self.decode_steps / decode_s if decode_s > 0 else None,
        }


# ---- model back-ends ---------------------------------------------------------------------------
#
# A decoder owns the static cache of one generate call and runs forward(input_ids [B, T],
# position_ids [B, T], cache_position [T], slot_mask [B, L]) -> fp32 logits of the last position
# [B, V], reading nothing on the host, so that a decode step can be captured.


def attention_allowed(cache_position: Tensor, slot_mask: Tensor, slots: Tensor) -> Tensor:
    """[B, 1, T, L] bool: query t may attend to cache slot s when s <= cache_position[t] and s holds a
    real token (slot_mask [B, L]); every query may attend to its own slot, so that a padding query
    (which has no real token before it) gets a finite output instead of a fully masked row whose NaN
    would reach the cache. `slots` is arange(L)."""
    causal = slots.unsqueeze(0) <= cache_position.unsqueeze(1)  # [T, L]
    own = slots.unsqueeze(0) == cache_position.unsqueeze(1)  # [T, L]
    return (slot_mask[:, None, None, :] & causal) | own


class _HFDecoder:
    """transformers causal LMs, with their `StaticCache` and a 4-D mask built here (the model takes
    a 4-D mask as is, which skips its mask construction and the host checks in it)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, device: torch.device):
        from transformers import StaticCache

        config = model.config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in HF_ATTENTION:
            raise ValueError(
                f"qlora_ext.generate supports attn_implementation {HF_ATTENTION}, the model uses {impl!r}: "
                f"load it with attn_implementation='sdpa', or use model.generate()"
            )
        self.model = model
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        if any(getattr(layer, "is_sliding", False) for layer in getattr(self.cache, "layers", [])):
            raise ValueError(
                "qlora_ext.generate does not support sliding-window attention layers (their cache holds "
                "fewer slots than the sequence); use model.generate()"
            )
        self.slots = torch.arange(max_len, device=device)
        # The 4-D mask goes in as an additive float mask in the model's dtype, built once a step:
        # eager attention adds it to its scores (transformers' fill value, finfo.min), and SDPA
        # would otherwise turn a bool mask into this float one itself (0 / -inf) in every layer,
        # three small kernels a layer and step.
        self.mask_dtype = model.get_input_embeddings().weight.dtype
        self.mask_fill = float("-inf") if impl == "sdpa" else torch.finfo(self.mask_dtype).min
        self.additive_mask = impl != "sdpa" or ADDITIVE_SDPA_MASK
        params = inspect.signature(type(model).forward).parameters
        # Older transformers take the cache slots as `cache_position` (without them a StaticCache
        # computes its length on the host); newer ones count them inside the cache.
        self.pass_cache_position = "cache_position" in params
        self.logits_to_keep = "logits_to_keep" if "logits_to_keep" in params else None

    def forward(self, input_ids, position_ids, cache_position, slot_mask) -> Tensor:
        mask = attention_allowed(cache_position, slot_mask, self.slots)
        if self.additive_mask:
            mask = torch.zeros(mask.shape, dtype=self.mask_dtype, device=mask.device).masked_fill_(~mask, self.mask_fill)
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      past_key_values=self.cache, use_cache=True)  # fmt: skip
        if self.pass_cache_position:
            kwargs["cache_position"] = cache_position
        if self.logits_to_keep:
            kwargs[self.logits_to_keep] = 1
        return self.model(**kwargs).logits[:, -1].float()


class _TinyLlamaDecoder:
    """qlora_ext's built-in TinyLlama, through its `forward_cached`."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, device: torch.device):
        limit = model.config.max_position_embeddings
        if max_len > limit:
            raise ValueError(
                f"the prompt length plus max_new_tokens is {max_len}, more than the model's "
                f"max_position_embeddings={limit}"
            )
        self.model = model
        self.cache = model.new_kv_cache(batch, max_len)
        self.slots = torch.arange(max_len, device=device)

    def forward(self, input_ids, position_ids, cache_position, slot_mask) -> Tensor:
        mask = attention_allowed(cache_position, slot_mask, self.slots)
        return self.model.forward_cached(input_ids, position_ids, self.cache, cache_position, mask).float()


def _is_transformers_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model, "get_output_embeddings") and bool(
        getattr(model, "can_generate", lambda: True)()
    )


def _decoder_type(model: nn.Module):
    from .builtin.tiny_llama import TinyLlama

    if isinstance(model, TinyLlama):
        return _TinyLlamaDecoder
    if _is_transformers_causal_lm(model):
        return _HFDecoder
    raise TypeError(
        f"model must be a transformers causal LM or qlora_ext's TinyLlama, got {type(model).__name__}"
    )


# ---- transformers' own generate on a prepared model ---------------------------------------------


def generate_in_eval_mode(model: nn.Module) -> bool:
    """Makes `model.generate(...)` (transformers' GenerationMixin) run with the model in eval mode,
    restoring each module's mode afterwards. Returns whether the model has such a `generate`.

    Why: prepare() turns on gradient checkpointing, and transformers' checkpointed decoder layers
    drop the KV cache whenever the model is in training mode (even under no_grad), so
    `model.generate` right after a training loop would feed only the newest token to a model
    that has forgotten the others, and return garbage; adapter dropout would also apply.
    Idempotent; a bound method (not a closure), so copy.deepcopy rebinds it to the copy.
    """
    if not callable(getattr(type(model), "generate", None)) or not _is_transformers_causal_lm(model):
        return False
    if not getattr(model, "_qlora_eval_generate", False):
        model.generate = types.MethodType(_generate_eval_mode, model)
        model._qlora_eval_generate = True
    return True


def _generate_eval_mode(self, *args, **kwargs):
    modes = {m: m.training for m in self.modules()}
    self.eval()
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        for module, mode in modes.items():
            module.train(mode)


# ---- argument checks ---------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arguments(model, input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p,
                     cuda_graphs, seed) -> None:  # fmt: skip
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, length] int64 tensor, got {input_ids.dtype} of shape "
                         f"{tuple(input_ids.shape)}")  # fmt: skip
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    vocab = _vocab_size(model)
    if vocab is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids must be token ids in [0, {vocab}), got values in [{low}, {high}]")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got {shape}")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not (cuda_graphs is True or cuda_graphs is False or (isinstance(cuda_graphs, str) and cuda_graphs == "auto")):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    device = _model_device(model)
    if device is not None and device != input_ids.device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}: move one of them")


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return getattr(embedding, "num_embeddings", None)


def _model_device(model: nn.Module) -> torch.device | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    return weight.device if isinstance(weight, Tensor) else None


def _token_ids(value, name: str) -> list[int]:
    """`value` (None, an id or a sequence of ids) as a list of ids ([] for None)."""
    if value is None:
        return []
    ids = [value] if _is_int(value) else value
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids or not all(
        _is_int(v) and v >= 0 for v in ids
    ):
        raise ValueError(f"{name} must be a token id (int >= 0), a non-empty list of them, or None, got {value!r}")
    return list(ids)


def _check_left_padding(attention_mask: Tensor, input_ids: Tensor) -> Tensor:
    """The mask as bool, after checking it marks left padding: in each row the ones are one run that
    ends at the last column."""
    mask = attention_mask.bool()
    values = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(torch.long)
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if not bool(mask[:, -1].all()):
        raise ValueError(
            "attention_mask must end with a real token in every row: pad on the left "
            "(tokenizer.padding_side = 'left') and give each row at least one token"
        )
    if bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
        raise ValueError("attention_mask must mark left padding: in each row, zeros may only precede the ones")
    return mask


__all__ = ["generate", "generate_in_eval_mode", "attention_allowed", "GRAPH_WARMUP_STEPS", "EOS_CHECK_INTERVAL"]
