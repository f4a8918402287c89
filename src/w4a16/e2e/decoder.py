"""One decode step of a transformers model on a static cache, capturable as a CUDA graph (what
the whole-model harness times, ``speed.py`` and ``interleaved.py``)."""
from __future__ import annotations

import inspect

import torch


class StaticDecoder:
    """One decode step of ``model`` for ``batch`` sequences on a transformers StaticCache.

    Inputs live in static tensors (``ids`` int64 [batch, 1], positions) so the step can be
    captured as a CUDA graph. Works with the cache passed as ``past_key_values`` (+ an explicit
    ``cache_position``, transformers 4.x) or as ``cache`` (positions kept by the cache, 5.x).
    """

    def __init__(self, model, batch: int, context: int, prompt_len: int, device: str, compile: bool = False):
        from transformers import StaticCache

        self.model, self.batch, self.prompt_len, self.device = model, batch, prompt_len, device
        # compile: the step's forward goes through torch.compile (inductor fuses the small
        # non-GEMM kernels); the W4A16 GEMM is the custom op w4a16::gemm inside the compiled graph.
        self.forward = torch.compile(model.forward, dynamic=False) if compile else model.forward
        # A compiled step is traced after one eager step: the weights are then prepared in every
        # layout the decode shape uses (preparing inside the trace would break the graph per layer).
        self.eager_first = compile
        dtype = next(model.parameters()).dtype
        try:
            self.cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=context,
                                     device=device, dtype=dtype)
        except TypeError:
            self.cache = StaticCache(config=model.config, max_cache_len=context)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.explicit_position = "cache_position" in params
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.kwargs = {self.cache_kw: self.cache, "use_cache": True,
                       "position_ids": torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)}
        if self.explicit_position:
            self.kwargs["cache_position"] = torch.tensor([prompt_len], device=device)
        self.graph, self.out, self.used = None, None, False

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt int64 [batch, prompt_len]: reset the cache, fill it; -> last logits [batch, V]."""
        if self.used:
            self.cache.reset()
        self.used = True
        P = prompt.shape[1]
        pos = torch.arange(P, device=self.device)
        kw = {self.cache_kw: self.cache, "use_cache": True, "position_ids": pos.expand(self.batch, P)}
        if self.explicit_position:
            kw["cache_position"] = pos
        return self.model(input_ids=prompt, **kw).logits[:, -1]

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode ``self.ids`` at position prompt_len -> logits [batch, V] (eager)."""
        if self.eager_first:
            self.eager_first = False
            # (a cache that keeps its own position, transformers 5, moves one slot on: timing
            # steps do not care, and a check starts from a fresh prefill)
            self.model.forward(input_ids=self.ids, **self.kwargs)
        return self.forward(input_ids=self.ids, **self.kwargs).logits[:, -1]

    def capture(self, warmup: int = 3) -> None:
        """Record :meth:`step` as a CUDA graph (after ``warmup`` eager steps on a side stream)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step()
        self.graph, self.out = graph, out

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.out
