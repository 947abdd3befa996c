"""CUDA graphs: a fixed-shape GPU computation replayed with one launch.

At 16x16 latents one UNet call is about a thousand small kernels, and
launching them one by one from Python takes longer than running them (the
profile in docs/BENCHMARKS.md). A captured graph replays them all at once.
Only CUDA tensors of fixed shapes qualify, and nothing inside may read a
value back to the host.

:class:`ReplayedStep` is the one mechanism: the diffusion training step
(``train_util.TrainLoop``), the VAE training step (``vae_training``) and
:class:`GraphedCall` (a sampler's whole denoising step, or its model call,
one graph per input shape) all replay through it.
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


class GraphedCall:
    """``fn(*tensors, **tensors)`` replayed from a CUDA graph, one graph per
    signature (positions, keywords, shapes, dtypes, strides, autocast), each a
    :class:`ReplayedStep` (the first calls eager, the next captured); each
    call returns a copy of the output tensor. Inference only: with grad
    enabled, off CUDA, or with an argument that is not a tensor, ``fn`` runs
    itself; a failed capture (e.g. a host read inside ``fn``) is said once and
    from then on ``fn`` runs eagerly.

    A replay runs what ``fn`` did at its capture: ``fn`` must compute from its
    tensor arguments alone (what it closes over stays fixed), and the modules
    it runs must keep their weight tensors while this object is in use.
    """

    device_type = "cuda"  # where graphs are captured (the tests stand in for them on the CPU)

    # One eager call per signature before the capture is enough for inference
    # (cuDNN's autotuner picks its kernels in it); a second cost 7% of a
    # 256-sample DDIM-50 call on an H100 (docs/BENCHMARKS.md).
    def __init__(self, fn, warmup_steps=1):
        self.fn = fn
        self.warmup_steps = warmup_steps
        self._steps = {}
        self._pool = None
        self._failed = False

    def __getattr__(self, name):
        # Samplers and guidance read attributes of the model (e.g. ``num_classes``).
        fn = self.__dict__.get("fn")
        if fn is None:  # not built yet (copy, pickle)
            raise AttributeError(name)
        return getattr(fn, name)

    def __call__(self, *args, **kwargs):
        values = (*args, *kwargs.values())
        eager = (self._failed or torch.is_grad_enabled() or not values
                 or not all(torch.is_tensor(v) and v.device.type == self.device_type for v in values))
        if eager:
            return self.fn(*args, **kwargs)
        names = tuple(sorted(kwargs))
        tensors = (*args, *(kwargs[k] for k in names))
        key = (len(args), names, tuple((tuple(v.shape), v.dtype, v.stride()) for v in tensors), _autocast_state())
        step = self._steps.get(key)
        if step is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every signature's graph

            def call(*values, positional=len(args), names=names):
                with no_autocast_cache():
                    return self.fn(*values[:positional], **dict(zip(names, values[positional:])))

            step = self._steps[key] = ReplayedStep(call, self.warmup_steps, pool=self._pool)
        try:
            return step(*tensors).clone()
        except RuntimeError as err:
            if step.graph is not None:
                raise  # a replay failed: a real error, not a capture problem
            self._failed = True
            # Said once, on stderr (this module sits below the logger).
            warnings.warn(f"CUDA graph capture failed ({str(err).splitlines()[0]}); running eagerly")
            torch.cuda.synchronize()
            return self.fn(*args, **kwargs)


class GraphCache:
    """One :class:`GraphedCall` per name, kept for a whole sampling call so
    that each batch replays the graphs of the first: ``graphs(name, fn)``
    returns the one made from the first ``fn`` given under ``name`` (a later
    ``fn`` must compute the same thing of its tensors)."""

    def __init__(self):
        self._calls = {}

    def __call__(self, name, fn):
        call = self._calls.get(name)
        if call is None:
            call = self._calls[name] = GraphedCall(fn)
        return call
