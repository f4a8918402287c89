"""W4A16Experts: a transformers MoE model's experts module (``Qwen3MoeExperts``, ``MixtralExperts``,
``Qwen2MoeExperts``, ``DeepseekV3Experts``, ...: 3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj``
[E, H, I] parameters, SiLU, ``forward(hidden_states, top_k_index, top_k_weights)``) with int4
weights, run by :func:`w4a16.moe.fused_moe`."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import spec
from ..errors import expect
from ..nn import codes_from_state_dict
from .ops import fused_moe
from .weights import QuantizedExperts

PARTS = ("qweight", "scales", "zeros")


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def experts_reason(module: nn.Module, group_size: int) -> Optional[str]:
    """Why ``module`` is not an experts module this package converts (None: it is one)."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3):
        return "not an experts module (no 3-D gate_up_proj and down_proj)"
    if getattr(module, "is_transposed", False):
        return "transposed expert weights (gate_up_proj [E, H, 2I]) are not converted"
    if getattr(module, "is_concatenated", True) is False:
        return "interleaved gate/up rows are not converted (gate rows, then up rows, are)"
    E, I2, H = gu.shape
    if tuple(dn.shape) != (E, H, I2 // 2) or I2 % 2:
        return f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} are not [E, 2I, H] and [E, H, I]"
    if not _is_silu(getattr(module, "act_fn", None)):
        return f"activation {type(getattr(module, 'act_fn', None)).__name__} (only SiLU is fused)"
    if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
        return "experts with biases"
    for name, t in (("hidden size", H), ("intermediate size", I2 // 2)):
        if t % 2:
            return f"{name} {t} is odd"
        if group_size != -1 and t % group_size:
            return f"{name} {t} is not a multiple of group_size {group_size}"
    if gu.is_meta or dn.is_meta:
        return "weights are on the meta device"
    return None


PROJECTIONS = ("gate_up", "down")


class W4A16Experts(nn.Module):
    """E experts with int4 weights: ``forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]`` as the float module it replaces.

    The module holds two :class:`QuantizedExperts` (``weights()``), gate_up [E, 2I, H] and down
    [E, H, I]; their scales and zeros are registered buffers (``gate_up_scales``, ``down_zeros``,
    ...: views of the experts' own tensors, zeros only for asymmetric weights), their codes live
    once, in the layout of the kernel that runs them (``gate_up_qweight`` and ``down_qweight``
    give the plain uint8 [E, N, K/2] codes). ``state_dict`` carries all six parts in the plain
    layout; ``load_state_dict``, ``.to()``, assignment of a part (validated) and in-place edits
    reach the next forward."""

    def __init__(self, gate_up: QuantizedExperts, down: QuantizedExperts, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.__dict__["_experts"] = {}
        self.set_weights(gate_up, down)

    def set_weights(self, gate_up: QuantizedExperts, down: QuantizedExperts) -> None:
        """Hold ``gate_up`` [E, 2I, H] and ``down`` [E, H, I] (e.g. a tensor-parallel rank's slices)."""
        for arg, w in (("gate_up", gate_up), ("down", down)):
            expect(isinstance(w, QuantizedExperts), arg, "a w4a16.moe.QuantizedExperts", type(w).__name__)
        E, I2, H = gate_up.shape
        expect(tuple(down.shape) == (E, H, I2 // 2), "down.shape", (E, H, I2 // 2), tuple(down.shape))
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, I2 // 2
        for prefix, w in zip(PROJECTIONS, (gate_up, down)):
            self._experts[prefix] = w
            for part in PARTS[1:]:
                self._buffers[f"{prefix}_{part}"] = getattr(w, part)
        self.__dict__["_pair"] = (gate_up, down)
        self.__dict__["_held"] = tuple(self._buffers[f"{p}_{part}"] for p in PROJECTIONS for part in PARTS[1:])

    @property
    def group_sizes(self) -> Tuple[int, int]:
        """(gate_up's, down's) group size as given (-1: per channel)."""
        return self._experts["gate_up"].group_size, self._experts["down"].group_size

    @property
    def gate_up_qweight(self) -> torch.Tensor:
        """uint8 [E, 2I, H/2] plain codes (``QuantizedExperts.qweight``)."""
        return self.weights()[0].qweight

    @property
    def down_qweight(self) -> torch.Tensor:
        """uint8 [E, H, I/2] plain codes (``QuantizedExperts.qweight``)."""
        return self.weights()[1].qweight

    def _replace(self, prefix: str, part: str, value) -> None:
        """The experts of ``prefix`` with ``part`` replaced by ``value`` (validated as the constructor does)."""
        w = self.weights()[PROJECTIONS.index(prefix)]
        parts = dict(zip(PARTS, (w.plain_codes(), w.scales, w.zeros)), **{part: value})
        new = QuantizedExperts(parts["qweight"], parts["scales"], parts["zeros"], w.group_size)
        expect(new.shape == w.shape, f"{prefix}_{part}", f"the experts' shape {w.shape}", new.shape)
        ws = dict(zip(PROJECTIONS, self.weights()), **{prefix: new})
        self.set_weights(ws["gate_up"], ws["down"])

    def __setattr__(self, name, value):
        if self.__dict__.get("_experts"):
            for prefix in PROJECTIONS:
                if name.startswith(prefix + "_") and name[len(prefix) + 1:] in PARTS:
                    self._replace(prefix, name[len(prefix) + 1:], value)
                    return
        super().__setattr__(name, value)

    def weights(self) -> Tuple[QuantizedExperts, QuantizedExperts]:
        """(gate_up, down). A buffer replaced behind the module's back (``module._buffers[...] =``)
        is taken in, checked, on the next call."""
        held = self.__dict__["_held"]
        now = tuple(self._buffers[f"{p}_{part}"] for p in PROJECTIONS for part in PARTS[1:])
        if any(a is not b for a, b in zip(held, now)):
            gu, dn = (QuantizedExperts(self._experts[p].plain_codes(), now[2 * i], now[2 * i + 1],
                                       self._experts[p].group_size) for i, p in enumerate(PROJECTIONS))
            self.set_weights(gu, dn)
        return self._pair

    def _apply(self, fn, *args, **kwargs):
        codes = [w.plain_codes() for w in self.weights()]
        out = super()._apply(fn, *args, **kwargs)
        moved = [fn(c) for c in codes]
        if all(m is c for m, c in zip(moved, codes)):
            self.weights()      # the codes stay (and their packed copy): take in the converted buffers
            return out
        gu, dn = (QuantizedExperts(m, self._buffers[f"{p}_scales"], self._buffers[f"{p}_zeros"],
                                   self._experts[p].group_size) for m, p in zip(moved, PROJECTIONS))
        self.set_weights(gu, dn)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for p, w in zip(PROJECTIONS, self.weights()):
            codes = w.plain_codes()
            destination[f"{prefix}{p}_qweight"] = codes if keep_vars else codes.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        new = list(self.weights())
        for i, p in enumerate(PROJECTIONS):
            w = new[i]
            E, N, K = w.shape
            codes = codes_from_state_dict(state_dict, f"{prefix}{p}_qweight", (E, N, K // 2), w.device, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            if codes is not None:
                new[i] = QuantizedExperts(codes, w.scales, w.zeros, w.group_size)
        self.set_weights(*new)

    @classmethod
    def from_float(cls, module: nn.Module, group_size: int = 128, symmetric: bool = True,
                   dtype: Optional[torch.dtype] = None) -> "W4A16Experts":
        """Quantize a float experts module (round to nearest, as :func:`w4a16.quantize`)."""
        reason = experts_reason(module, group_size)
        expect(reason is None, "module", "an experts module with gate_up_proj [E, 2I, H], down_proj [E, H, I], SiLU",
               reason)
        w = module.gate_up_proj
        if dtype is None:
            dtype = w.dtype if w.dtype in spec.ACTIVATION_DTYPES else torch.float16
        with torch.no_grad():
            gu = QuantizedExperts.quantize(module.gate_up_proj.detach(), group_size, symmetric, dtype)
            dn = QuantizedExperts.quantize(module.down_proj.detach(), group_size, symmetric, dtype)
        return cls(gu, dn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        gate_up, down = self.weights()
        x = hidden_states.reshape(-1, self.hidden_dim)
        y = fused_moe(x.to(gate_up.dtype), gate_up, down, top_k_index, top_k_weights, backend=self.backend)
        return y.to(hidden_states.dtype).reshape(hidden_states.shape)

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.weights())

    def dequantize_into(self, module: nn.Module) -> nn.Module:
        """Write this module's weights, dequantized, into the float experts module ``module``
        (its gate_up_proj [E, 2I, H] and down_proj [E, H, I], in their dtype); returns it. For
        comparing a quantized model with the float model that holds the same int4 weights."""
        gu, dn = self.weights()
        for attr, w in (("gate_up_proj", gu), ("down_proj", dn)):
            p = getattr(module, attr)
            expect(tuple(p.shape) == w.shape, f"{attr}.shape", w.shape, tuple(p.shape))
            held = w.plain_codes()   # one rebuild of the codes for all experts
            with torch.no_grad():
                for e in range(w.shape[0]):   # one expert's fp32 temporaries at a time
                    p.data[e] = w.dequantize(p.dtype, experts=[e])[0].to(p.device)
            del held
        return module

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"group_sizes={self.group_sizes}")


def experts_sites(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module, str]]:
    """(name, module, parent, attribute) of every module below ``model`` that holds 3-D
    gate_up_proj / down_proj parameters (an experts module, convertible or not)."""
    out, parents = [], dict(model.named_modules())
    for name, m in model.named_modules():
        if name and not isinstance(m, W4A16Experts) and isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) \
                and getattr(m, "gate_up_proj").dim() == 3:
            parent, _, attr = name.rpartition(".")
            out.append((name, m, parents[parent], attr))
    return out


def quantize_experts(model: nn.Module, group_size: int = 128, symmetric: bool = True,
                     dtype: Optional[torch.dtype] = None, skip=()) -> Tuple[List[Tuple[str, int, int]], Dict[str, str]]:
    """Replace every convertible experts module of ``model`` in place with a W4A16Experts.
    Returns ([(name, bytes before, bytes after)], {name: why left in floating point})."""
    from ..model import name_matches

    done, skipped = [], {}
    for name, m, parent, attr in experts_sites(model):
        hit = name_matches(name, skip)
        reason = (f"skipped by name '{hit}'" if hit is not None else experts_reason(m, group_size))
        if reason is None and not (torch.isfinite(m.gate_up_proj).all() and torch.isfinite(m.down_proj).all()):
            reason = "weights are not all finite"
        if reason is not None:
            skipped[name] = reason
            continue
        new = W4A16Experts.from_float(m, group_size, symmetric, dtype)
        before = sum(p.numel() * p.element_size() for p in (m.gate_up_proj, m.down_proj))
        setattr(parent, attr, new)
        done.append((name, before, new.nbytes()))
    return done, skipped


def with_dequantized_experts(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """A copy of the float ``model`` whose experts modules hold the dequantized int4 weights of
    ``quantized`` (the same model after :func:`w4a16.quantize_model`): the float reference of the
    experts' arithmetic, for checking a quantized MoE model."""
    import copy

    out = copy.deepcopy(model)
    q = dict(quantized.named_modules())
    for name, m in out.named_modules():
        if isinstance(q.get(name), W4A16Experts):
            q[name].dequantize_into(m)
    return out
