"""CUDA graphs: a fixed-shape GPU computation replayed with one launch.

At 16x16 latents one UNet call is about a thousand small kernels, and
launching them one by one from Python takes longer than running them (the
profile in docs/BENCHMARKS.md). A captured graph replays them all at once.
Only CUDA tensors of fixed shapes qualify, and nothing inside may read a
value back to the host.

:class:`GraphedForward` serves the samplers (one graph per input shape);
the training step captures itself (``train_util.TrainLoop``) with
:func:`capture`.
"""

import warnings

import torch


def graphs_usable(device):
    """True where graphs can run: a CUDA device."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def capture(fn, warmup_steps=2, pool=None):
    """Run ``fn()`` ``warmup_steps`` times on a side stream, then capture one
    more call into a graph. Returns ``(graph, output of the captured call)``.

    The warm-up calls really run (cuDNN/cuBLAS pick their kernels, lazy state
    such as optimizer moments is created); the captured call does not run
    until ``graph.replay()``.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output


def _autocast_state():
    if not torch.is_autocast_enabled("cuda"):
        return None
    return torch.get_autocast_dtype("cuda")


def no_autocast_cache():
    """Autocast as it is now, but without its weight-cast cache: a cached
    cast made outside a capture would be freed while the graph still reads it."""
    dtype = _autocast_state()
    return torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False)


class GraphedForward:
    """``model(x, t, **tensors)`` replayed from a CUDA graph, one graph per
    input signature (shapes, dtypes, autocast). Inference only: with grad
    enabled, off CUDA, or with a non-tensor keyword it calls ``model`` itself.

    Each call copies the inputs into the graph's own buffers, replays, and
    returns a copy of the output (the next replay overwrites the buffer).
    The model's weights must not be replaced while this object is in use.
    """

    def __init__(self, model, warmup_steps=2):
        self.model = model
        self.warmup_steps = warmup_steps
        self._graphs = {}
        self._pool = None
        self._failed = False

    def __getattr__(self, name):
        # Samplers and guidance read attributes of the model (e.g. ``num_classes``).
        return getattr(self.__dict__["model"], name)

    def __call__(self, x, t, **kwargs):
        eager = (self._failed or torch.is_grad_enabled() or x.device.type != "cuda"
                 or not all(torch.is_tensor(v) for v in kwargs.values()))
        if eager:
            return self.model(x, t, **kwargs)
        inputs = {"x": x, "t": t, **kwargs}
        key = (tuple((k, tuple(v.shape), v.dtype, v.stride()) for k, v in inputs.items()), _autocast_state())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(inputs)
            if entry is None:
                return self.model(x, t, **kwargs)
            self._graphs[key] = entry
        static, graph, output = entry
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return output.clone()

    def _capture(self, inputs):
        static = {name: value.clone() for name, value in inputs.items()}

        def call():
            with no_autocast_cache():
                return self.model(static["x"], static["t"], **{k: v for k, v in static.items() if k not in ("x", "t")})

        try:
            graph, output = capture(call, self.warmup_steps, pool=self._pool)
        except RuntimeError as err:  # e.g. a host read inside a custom wrapper
            self._failed = True
            # Only speed is lost; said once, on stderr (this module sits below the logger).
            warnings.warn(f"CUDA graph capture of the model failed ({str(err).splitlines()[0]}); sampling eagerly")
            torch.cuda.synchronize()
            return None
        self._pool = graph.pool()
        return static, graph, output
