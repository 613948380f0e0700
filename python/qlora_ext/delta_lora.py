"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411) on a frozen NF4 base, kept exact and compact.

The paper trains A, B as LoRA does (gradients reach A and B through the low-rank path only, W
gets no gradient and no optimizer state; no dropout on the low-rank path) and, after every
optimizer step from step K on, also moves the base weight by the change of the low-rank product:

    W ← W + λ·(B_{t+1}·A_{t+1} − B_t·A_t)                       (paper: A·B in its notation)

The sum telescopes: after step t ≥ K, W_t = W_0 + λ·(B_t·A_t − B_K·A_K), where (A_K, B_K) are
the factors when the updates began. So instead of re-quantizing an NF4 base every step (lossy:
4-bit rounding would swallow each small update) or keeping a dense [out, in] residual (not
compact), this adapter keeps W_0 in NF4 and the snapshot (A_K, B_K) as buffers, and computes

    y = x·deq(W_0)ᵀ + s·(x·Aᵀ)·Bᵀ  +  λ·(x·Aᵀ)·Bᵀ − λ·(x·A_Kᵀ)·B_Kᵀ
        ─────── LoRA, trains A, B ──  ── W_t − W_0: A, B treated as constants ──

which is the paper's forward and its gradients exactly (up to floating-point rounding; it is in
fact more exact than updating a 16-bit W in place, which rounds every step). dx sees the whole
W_t; dA, dB see only the LoRA path, as in the paper. The first two low-rank terms are one call of
the LoRA op with scale s + λ, and A's and B's gradients (linear in the scale) are multiplied by
s/(s + λ) on the way back, so Delta-LoRA costs no extra GEMM over LoRA while B_K = 0.

Cost: memory, one more copy of A and B (the snapshot buffers; adapter-sized, ~0.5% of the model
at r = 16); compute, nothing while B_K = 0 (updates from step 0, the default, since B starts at
zero), two thin GEMMs per forward and backward after a warm-up of K > 0 steps.

`DeltaLoRAUpdater(model, start_step=K).step()` after each optimizer step implements the schedule:
the λ term is off for the first K steps, and at step K the snapshot is taken and it turns on.

λ (`delta_lambda`, the paper's update ratio) multiplies the plain product B·A, as the paper
writes it, not the LoRA-scaled s·B·A. Saved in our own format (PEFT has no Delta-LoRA): PEFT's
LoRA keys plus `delta_lora_A0`, `delta_lora_B0`, `delta_lora_lambda` (the current λ, 0 before
step K), and `"qlora_ext_method": "delta_lora"`, `"delta_lora_lambda"` in adapter_config.json.
PEFT cannot reproduce the λ term from that file; use `merge_and_export` for a dense model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .adapters import LoRAAdapter
from .lora_linear import nf4_lora_linear


def check_delta_lambda(value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"delta_lambda (Delta-LoRA's update ratio λ) must be a finite number >= 0, got {value!r}")
    return float(value)


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by `factor` in backward."""

    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


class DeltaLoRAAdapter(LoRAAdapter):
    """Delta-LoRA: LoRA's A, B, s plus the snapshot (A_K, B_K) and λ; see the module docstring."""

    method = "delta_lora"

    def __init__(self, in_features: int, out_features: int, r: int = 16, alpha: float = 16,
                 rslora: bool = False, delta_lambda: float = 2.0, device=None, dtype: torch.dtype | None = None):  # fmt: skip
        super().__init__(in_features, out_features, r, alpha, 0.0, rslora, device=device, dtype=dtype)
        self.delta_lambda = check_delta_lambda(delta_lambda)  # the configured λ
        self.register_buffer("delta_lora_A0", torch.zeros(r, in_features, device=device, dtype=dtype))
        self.register_buffer("delta_lora_B0", torch.zeros(out_features, r, device=device, dtype=dtype))
        # the λ in effect: delta_lambda once started (the default, at step 0), 0 before
        self.register_buffer("delta_lora_lambda", torch.full((1,), self.delta_lambda, device=device, dtype=torch.float32))
        self._sync_state()

    def _sync_state(self) -> None:
        """Mirror the buffers in Python (read once here, never in forward: no device sync per step)."""
        self._lambda_now = float(self.delta_lora_lambda.item())
        self._snapshot_is_zero = not bool(self.delta_lora_B0.any())

    def start(self) -> None:
        """Begin moving W: snapshot (A_K, B_K) ← (A, B) and switch the λ term on."""
        with torch.no_grad():
            self.delta_lora_A0.copy_(self.lora_A.weight)
            self.delta_lora_B0.copy_(self.lora_B.weight)
            self.delta_lora_lambda.fill_(self.delta_lambda)
        self._sync_state()

    def stop(self) -> None:
        """Switch the λ term off (W back to W_0): the state before step K."""
        with torch.no_grad():
            self.delta_lora_lambda.zero_()
            self.delta_lora_A0.zero_()
            self.delta_lora_B0.zero_()
        self._sync_state()

    def _base_shift_factors(self) -> tuple[Tensor, Tensor]:
        """(P [k, in], Q [out, k]) with Q·P = λ·(B·A − B_K·A_K), detached."""
        lam = self._lambda_now
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        if self._snapshot_is_zero:
            return a, b * lam
        return torch.cat([a, self.delta_lora_A0]), torch.cat([b, -self.delta_lora_B0], dim=1) * lam

    def forward_with_base(self, layer, x: Tensor) -> Tensor:
        a, b, lam = self.lora_A.weight, self.lora_B.weight, self._lambda_now
        if lam == 0:
            return nf4_lora_linear(x, layer.weight, layer.bias, a, b, self.scale)
        # λ·(x·Aᵀ)·Bᵀ rides in the LoRA op as scale s + λ (dx = dy·W_t is then exact); A and B must
        # get only the s-part of their gradients, which are linear in the scale: scale them back.
        total = self.scale + lam
        keep = self.scale / total
        a, b = _ScaleGrad.apply(a, keep), _ScaleGrad.apply(b, keep)
        y = nf4_lora_linear(x, layer.weight, layer.bias, a, b, total)
        if self._snapshot_is_zero:
            return y
        a0, b0 = self.delta_lora_A0.to(x.dtype), self.delta_lora_B0.to(x.dtype)
        return y - lam * (x @ a0.t()) @ b0.t()  # − λ·B_K·A_K, a constant

    def delta(self, x: Tensor) -> Tensor:
        out = super().delta(x)
        if self._lambda_now == 0:
            return out
        p, q = self._base_shift_factors()
        return out + (x.to(p.dtype) @ p.t()) @ q.t()

    def delta_weight(self) -> Tensor:
        """s·B·A + λ·(B·A − B_K·A_K) [out, in] fp32: the adapter plus the base's accumulated shift."""
        p, q = self._base_shift_factors()
        shift = q.float() @ p.float() if self._lambda_now else 0.0
        return super().delta_weight() + shift

    # ---- config ---------------------------------------------------------------------------------

    def peft_config(self) -> dict:
        return {**super().peft_config(), "delta_lora_lambda": self.delta_lambda}

    @classmethod
    def peft_model_config(cls, layer_configs: dict[str, dict]) -> dict:
        return {**super().peft_model_config(layer_configs), "qlora_ext_method": cls.method}

    @classmethod
    def validate_peft_config(cls, config: dict) -> None:
        super().validate_peft_config(config)
        check_delta_lambda(config.get("delta_lora_lambda"))
        if config.get("lora_dropout", 0.0):
            raise ValueError("Delta-LoRA has no dropout on the low-rank path, got lora_dropout "
                             f"{config['lora_dropout']!r}")  # fmt: skip

    @classmethod
    def from_peft_config(cls, in_features, out_features, config, device=None, dtype=None) -> "DeltaLoRAAdapter":
        return cls(in_features, out_features, config["r"], config["lora_alpha"], config.get("use_rslora", False),
                   config["delta_lora_lambda"], device=device, dtype=dtype)  # fmt: skip

    def apply_peft_config(self, config: dict) -> None:
        super().apply_peft_config(config)
        self.delta_lambda = check_delta_lambda(config["delta_lora_lambda"])
        self._sync_state()  # the loaded buffers

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, delta_lambda={self.delta_lambda}, active={self._lambda_now != 0}"


class DeltaLoRAUpdater:
    """Delta-LoRA's per-step hook. Call `step()` once after every `optimizer.step()`.

    With the telescoped form (module docstring) the base moves implicitly with A and B, so a step
    only advances the schedule: the λ term is off until `start_step` optimizer steps have been
    taken, then the snapshot is taken and it stays on. With start_step = 0 (the default) it is on
    from the start and `step()` just counts. Adapters that already hold trained values (a resumed
    run) keep their saved state; restore the counter with `load_state_dict`.
    """

    def __init__(self, model: nn.Module, start_step: int = 0):
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        self.adapters = [m for m in model.modules() if isinstance(m, DeltaLoRAAdapter)]
        if not self.adapters:
            raise ValueError("the model has no Delta-LoRA adapters: use qlora_ext.prepare(model, method='delta_lora')")
        self.start_step, self.steps = start_step, 0
        for a in self.adapters:
            if bool(a.lora_B.weight.any()):
                continue  # trained or loaded: keep its state (resume with load_state_dict)
            if start_step > 0:
                a.stop()
            elif a._lambda_now == 0:
                a.start()

    @property
    def started(self) -> bool:
        return self.steps >= self.start_step

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.start_step:
            for a in self.adapters:
                a.start()

    def state_dict(self) -> dict:
        return {"steps": self.steps, "start_step": self.start_step}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.start_step = int(state["steps"]), int(state["start_step"])
