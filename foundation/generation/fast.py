"""What makes decoding fast without changing what it computes.

- :func:`merged_adapters`: a LoRA policy generates with each adapter folded into its base weight
  (one matmul per projection instead of three), the way TRL's and OpenRLHF's unwrap-for-generation
  do. The base weight tensors are swapped back on exit, so the trained weights (the adapter and the
  base) are bit-for-bit what they were: no ``W + BA - BA`` rounding as with peft's merge/unmerge.
- :func:`small_batch_linears`: on CPU, linear layers run on oneDNN with prepacked weights (what
  inductor's CPU backend does when freezing). Decoding multiplies few rows (one per sequence) by
  each weight, where MKL's ``x @ W.T`` reached 10-40 GFLOP/s on the 2-core AMD EPYC measured here
  and prepacked oneDNN 30-55 (64 at 128 rows). Without oneDNN: ``W @ x.T`` for few rows, the GEMM
  shape MKL handles well (``python -m benchmarks generate`` measures the kernels in every run).
- :class:`BufferCache`: a KV cache that writes each step into preallocated buffers (grown by
  doubling) instead of concatenating the whole cache at every step, and drops finished rows with
  one index_select.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# rows (tokens in the batch) up to which the transposed GEMM is used; prefill of long batches keeps F.linear
SMALL_ROWS = 96
# prepack linear weights for oneDNN when they total less than this (the packed copy lives during generation)
PACK_LIMIT_BYTES = 4 << 30


def _lora_layers(model: Any) -> list[Any]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; without it there is nothing to merge
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _mergeable(layer: Any) -> bool:
    import torch

    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if type(base) is not torch.nn.Linear or weight is None or hasattr(weight, "ds_id"):  # quantised or ZeRO-3 partitioned
        return False
    if layer.merged or getattr(layer, "disable_adapters", False):
        return False
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    return not any(a in getattr(layer, "lora_variant", {}) for a in active)  # DoRA and other variants: forward unmerged


@contextlib.contextmanager
def merged_adapters(model: Any) -> Iterator[int]:
    """Fold every active LoRA adapter into its base weight for the duration; yields how many layers
    were merged (0 when the model has none or they cannot be merged: quantised, ZeRO-3, DoRA).

    Exact on exit: each base weight's original tensor is put back (one extra copy of the adapted
    weights is held meanwhile). The model must not be trained inside."""
    import torch

    layers = _lora_layers(model)
    if not layers or not all(_mergeable(layer) for layer in layers):
        if layers:
            log.debug("generation: LoRA adapters left unmerged (quantised, partitioned or a variant such as DoRA)")
        yield 0
        return
    # A base weight that another module also uses (an LM head tied to the input embeddings) stays unmerged: folding
    # the adapter into it would change the other module too (the embeddings), and the sampled tokens would come from
    # another distribution than the policy's.
    users: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                users[id(param)] = users.get(id(param), 0) + 1
    shared = [layer for layer in layers if users.get(id(layer.get_base_layer().weight), 0) > 1]
    if shared:
        log.debug("generation: %d LoRA layer(s) over tied weights left unmerged", len(shared))
    saved: list[tuple[Any, Any, Any]] = []
    try:
        with torch.no_grad():
            for layer in (x for x in layers if all(x is not y for y in shared)):
                base = layer.get_base_layer()
                delta = None
                for a in layer.active_adapters:
                    if a in layer.lora_A:
                        d = layer.get_delta_weight(a)
                        delta = d if delta is None else delta + d
                original = base.weight.data
                if delta is not None:
                    base.weight.data = original + delta.to(original.dtype)
                saved.append((layer, base, original))
                layer.forward = base.forward  # the adapter is inside the weight now: skip its matmuls
        yield len(saved)
    finally:
        for layer, base, original in saved:
            base.weight.data = original
            del layer.forward


def _packed_linear(module: Any, packed: Any) -> Any:
    import torch

    op = torch.ops.mkldnn._linear_pointwise

    def forward(x: torch.Tensor) -> torch.Tensor:
        return op(x, packed, module.bias, "none", [], "")

    return forward


def _transposed_linear(module: Any, max_rows: int) -> Any:
    import torch
    import torch.nn.functional as F

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = module.weight, module.bias
        k = x.shape[-1]
        rows = x.numel() // k if k else 0
        if rows == 0 or rows > max_rows or x.dtype != w.dtype:
            return F.linear(x, w, b)
        y = torch.mm(w, x.reshape(rows, k).t())  # [out, rows]: MKL's fast shape for few rows
        if b is not None:
            y += b[:, None]
        return y.t().contiguous().view(*x.shape[:-1], w.shape[0])

    return forward


def _onednn_usable(dtype: Any = None) -> bool:
    import torch

    dtype = dtype or torch.float32
    try:
        w = (torch.arange(32, dtype=torch.float32).view(8, 4) / 7).to(dtype)  # no random draw: the caller's RNG stays put
        x = (torch.arange(12, dtype=torch.float32).view(3, 4) / 5).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
        ref = x.float() @ w.float().t()
        if dtype == torch.float32:
            return bool(torch.allclose(y, ref, atol=1e-5))
        return y.dtype == dtype and bool(torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2))  # bf16: 8 significant bits
    except Exception:  # an op that moved or a build without oneDNN (or its bf16): the MKL path instead
        return False


@contextlib.contextmanager
def small_batch_linears(model: Any, enabled: bool = True, max_rows: int = SMALL_ROWS,
                        pack_limit_bytes: int = PACK_LIMIT_BYTES) -> Iterator[str | None]:
    """On CPU, every fp32 ``nn.Linear`` of ``model`` runs on oneDNN with its weight prepacked for the
    duration (one extra copy of the linear weights, when they total under ``pack_limit_bytes``), or,
    without oneDNN, computes ``W @ x.T`` when it sees at most ``max_rows`` rows. A bf16 model (every linear
    bf16: ``eval.dtype: bfloat16`` on a CPU with native bf16) gets oneDNN's bf16 kernels prepacked the same way where
    this torch has them, else keeps ``F.linear``. Yields the kernel used ("onednn", "onednn-bf16", "transposed") or
    None (other devices, disabled, nothing to switch)."""
    import torch

    mods = []
    if enabled:
        mods = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
                and m.weight.dtype in (torch.float32, torch.bfloat16) and not hasattr(m.weight, "ds_id")]
        if len({m.weight.dtype for m in mods}) > 1:  # mixed: only the fp32 layers switch
            mods = [m for m in mods if m.weight.dtype == torch.float32]
    kernel = None
    if mods:
        size = sum(m.weight.numel() * m.weight.element_size() for m in mods)
        if mods[0].weight.dtype == torch.bfloat16:
            kernel = "onednn-bf16" if size <= pack_limit_bytes and _onednn_usable(torch.bfloat16) else None
            mods = mods if kernel else []
        else:
            kernel = "onednn" if size <= pack_limit_bytes and _onednn_usable() else "transposed"
    try:
        with torch.no_grad():
            for m in mods:
                if kernel in ("onednn", "onednn-bf16"):
                    m.forward = _packed_linear(m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach()))
                else:
                    m.forward = _transposed_linear(m, max_rows)
        yield kernel
    finally:
        for m in mods:
            if "forward" in m.__dict__:
                del m.forward


def buffer_cache(capacity: int) -> Any:
    """A transformers ``DynamicCache`` whose layers are :class:`BufferLayer` (lazily created)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _layer_factory(capacity)
    return cache


def _layer_factory(capacity: int) -> Any:
    BufferLayer = _buffer_layer_class()

    def make() -> Any:
        return BufferLayer(capacity)

    return make


_CLASS: Any = None


def _buffer_layer_class() -> Any:
    """Defined on first use so that importing this module does not import transformers."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import torch
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """Keys/values in ``[B, H, capacity, D]`` buffers; ``keys``/``values`` are views of the filled part."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = max(1, capacity)
            self.length = 0
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty(b, h, self.capacity, d)
            self._v = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[3])
            self.is_initialized = True

        def _views(self) -> None:
            self.keys = self._k[:, :, :self.length]
            self.values = self._v[:, :, :self.length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self.length + n > self.capacity:  # grow by doubling (a caller's estimate was short)
                self.capacity = max(2 * self.capacity, self.length + n)
                k, v = self._k, self._v
                self._k = k.new_empty(k.shape[0], k.shape[1], self.capacity, k.shape[3])
                self._v = v.new_empty(v.shape[0], v.shape[1], self.capacity, v.shape[3])
                self._k[:, :, :self.length] = k[:, :, :self.length]
                self._v[:, :, :self.length] = v[:, :, :self.length]
            self._k[:, :, self.length:self.length + n] = key_states
            self._v[:, :, self.length:self.length + n] = value_states
            self.length += n
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def allocate(self, batch: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
            """Empty buffers for ``batch`` rows shaped like these states ([b, H, T, D]); nothing filled yet."""
            self.dtype, self.device = key_like.dtype, key_like.device
            self._k = key_like.new_zeros(batch, key_like.shape[1], self.capacity, key_like.shape[3])
            self._v = value_like.new_zeros(batch, value_like.shape[1], self.capacity, value_like.shape[3])
            self.is_initialized = True

        def write(self, rows: Any, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Put ``keys``/``values`` [len(rows) or 1, H, n, D] at positions start..start+n of ``rows``."""
            n = keys.shape[2]
            self._k[rows, :, start:start + n] = keys
            self._v[rows, :, start:start + n] = values

        def set_length(self, length: int) -> None:
            self.length = length
            self._views()

        def reset(self) -> None:
            self.length = 0
            self._k = self._v = None
            super().reset()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("BufferLayer does not crop")

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._k = self._k.index_select(0, indices)
                self._v = self._v.index_select(0, indices)
                self._views()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

    _CLASS = BufferLayer
    return _CLASS
