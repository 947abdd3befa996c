"""CUDA graphs: a fixed-shape GPU computation replayed with one launch.

At 16x16 latents one UNet call is about a thousand small kernels, and
launching them one by one from Python takes longer than running them (the
profile in docs/BENCHMARKS.md). A captured graph replays them all at once.
Only CUDA tensors of fixed shapes qualify, and nothing inside may read a
value back to the host.

:class:`ReplayedStep` is the one mechanism: the diffusion training step
(``train_util.TrainLoop``), the VAE training step (``vae_training``) and
:class:`GraphedForward` (the samplers' model call, one graph per input
shape) all replay through it.
"""

import warnings

import torch


def graphs_usable(device):
    """True where graphs can run: a CUDA device."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


class ReplayedStep:
    """``step(*tensors)``, replayed from a CUDA graph after ``warmup_steps`` real calls.

    The first ``warmup_steps`` calls run ``step`` eagerly on a side stream, as
    capture requires (cuDNN and cuBLAS pick their kernels, an optimizer makes
    its state). The next call captures ``step`` on copies of its tensors (the
    graph's inputs); from then on every call copies its tensors into those
    inputs and replays. Returns ``step``'s output: once captured, the graph's
    own output tensors, which the next replay overwrites (copy what you keep).
    ``step`` must not read device values on the host.
    """

    def __init__(self, step, warmup_steps=2, pool=None):
        self.step = step
        self.warmup_left = warmup_steps
        self.pool = pool
        self.graph = None
        self.inputs = None
        self.output = None

    def fits(self, *tensors):
        """Whether ``tensors`` have the captured shapes and dtypes (True before capture)."""
        return self.inputs is None or (len(tensors) == len(self.inputs) and all(
            t.shape == s.shape and t.dtype == s.dtype for t, s in zip(tensors, self.inputs)))

    def __call__(self, *tensors):
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self._on_side_stream(lambda: self.step(*tensors))
        if self.graph is None:
            self.inputs = [t.clone() for t in tensors]
            self.graph, self.output = self._capture(lambda: self.step(*self.inputs))
        for static, value in zip(self.inputs, tensors):
            static.copy_(value)
        self.graph.replay()
        return self.output

    @staticmethod
    def _on_side_stream(fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            output = fn()
        torch.cuda.current_stream().wait_stream(side)
        return output

    def _capture(self, fn):
        """``(graph, output)``: ``fn`` recorded, not run (it runs at ``replay``)."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
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

    Per shape, the first calls run eagerly and the next is captured
    (:class:`ReplayedStep`); each call returns a copy of the output.
    The model's weights must not be replaced while this object is in use.
    """

    def __init__(self, model, warmup_steps=2):
        self.model = model
        self.warmup_steps = warmup_steps
        self._steps = {}
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
        names = ("x", "t", *sorted(kwargs))
        tensors = (x, t, *(kwargs[k] for k in names[2:]))
        key = (names, tuple((tuple(v.shape), v.dtype, v.stride()) for v in tensors), _autocast_state())
        step = self._steps.get(key)
        if step is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every shape's graph

            def call(x, t, *values, names=names[2:]):
                with no_autocast_cache():
                    return self.model(x, t, **dict(zip(names, values)))

            step = self._steps[key] = ReplayedStep(call, self.warmup_steps, pool=self._pool)
        try:
            return step(*tensors).clone()
        except RuntimeError as err:
            if step.graph is not None:
                raise  # a replay failed: a real error, not a capture problem
            # Capture failed (e.g. a host read inside a custom wrapper): only speed is lost.
            self._failed = True
            # Said once, on stderr (this module sits below the logger).
            warnings.warn(f"CUDA graph capture of the model failed ({str(err).splitlines()[0]}); sampling eagerly")
            torch.cuda.synchronize()
            return self.model(x, t, **kwargs)
