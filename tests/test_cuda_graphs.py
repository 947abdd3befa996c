"""ReplayedStep's bookkeeping, which the training steps and the samplers'
model call share: warm-up calls run on their own tensors, the capture works on
copies, and each later call copies its tensors into them before a replay.
The CUDA parts are stood in for on the CPU (CI has no GPU; the GPU runs are
in docs/BENCHMARKS.md)."""

import torch

from guided_diffusion_vae.runtime.cuda_graphs import GraphedCall, ReplayedStep


class HostReplay(ReplayedStep):
    """Side stream = a plain call; capture = remember ``fn``, replay = run it
    again into the captured output (a real capture runs nothing, so the call
    made here to learn the output's shape is dropped from the log)."""

    def __init__(self, step, log, **kw):
        super().__init__(step, **kw)
        self.log = log

    def _on_side_stream(self, fn):
        return fn()

    def _capture(self, fn):
        output = fn()
        self.log.pop()

        class Graph:
            def replay(graph):
                output.copy_(fn())

        return Graph(), output


def test_warmup_capture_and_replay_use_the_right_tensors():
    seen = []

    def step(x):
        seen.append(x.clone())
        return x * 2

    replayed = HostReplay(step, seen, warmup_steps=2)
    a, b, c, d = (torch.full((3,), float(v)) for v in (1, 2, 3, 4))
    assert torch.equal(replayed(a), a * 2) and torch.equal(replayed(b), b * 2)
    assert replayed.graph is None  # two warm-up calls, each a real step on its own batch
    out_c = replayed(c)
    assert replayed.graph is not None and replayed.inputs[0] is not c  # captured on a copy
    assert torch.equal(out_c, c * 2)
    out_d = replayed(d)
    assert out_d is out_c and torch.equal(out_d, d * 2)  # the graph's own output, overwritten
    assert torch.equal(c, torch.full((3,), 3.0))  # the caller's tensor is never written
    assert [float(x[0]) for x in seen] == [1, 2, 3, 4]
    assert replayed.fits(torch.zeros(3))
    assert not replayed.fits(torch.zeros(4)) and not replayed.fits(torch.zeros(3, dtype=torch.float64))
    assert not replayed.fits(torch.zeros(3), torch.zeros(3))


def test_a_graphed_call_runs_the_model_itself_off_cuda_and_with_grad():
    model = torch.nn.Linear(2, 2)
    graphed = GraphedCall(lambda x, t, **kw: model(x) + t)
    x, t = torch.ones(1, 2), torch.zeros(1, 2)
    with torch.no_grad():
        assert torch.equal(graphed(x, t), model(x))
    assert graphed(x, t).requires_grad and graphed._steps == {}


def test_a_graph_cache_keeps_the_first_function_of_each_name():
    """A sampling call asks its GraphCache for the same name once per batch:
    every batch gets the one GraphedCall made from the first function, which
    reads the function's attributes through (guidance reads the model's)."""
    from guided_diffusion_vae.runtime.cuda_graphs import GraphCache

    def first(x):
        return x + 1

    first.num_classes = 3
    cache = GraphCache()
    call = cache("step", first)
    assert cache("step", lambda x: x * 100) is call and cache("model", first) is not call
    assert call.num_classes == 3
    import copy

    assert copy.copy(call).num_classes == 3  # a copy is built without __init__: no recursion through fn
    x = torch.ones(2)
    with torch.no_grad():
        assert torch.equal(call(x), x + 1)  # off CUDA the first function runs itself
    assert call._steps == {}


def test_a_failed_capture_is_said_once_and_the_call_runs_eagerly(monkeypatch):
    """A function that cannot be captured (a host read inside it) costs
    speed, never the result: the capture's error is said once, as a warning
    naming it, and every call from then on runs the function itself."""
    import warnings

    from guided_diffusion_vae.runtime import cuda_graphs

    def refuse(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(ReplayedStep, "_on_side_stream", staticmethod(lambda fn: fn()))
    monkeypatch.setattr(ReplayedStep, "_capture", refuse)
    monkeypatch.setattr(GraphedCall, "device_type", "cpu")
    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(cuda_graphs.torch.cuda, "synchronize", lambda: None)
    calls = []

    def step(x):
        calls.append(1)
        return x * 3

    graphed = GraphedCall(step, warmup_steps=1)
    x = torch.arange(4.0)
    with torch.no_grad(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        outputs = [graphed(x) for _ in range(4)]
    assert all(torch.equal(out, x * 3) for out in outputs)
    assert [str(w.message) for w in said] == [
        "CUDA graph capture failed (operation not permitted when stream is capturing); running eagerly"]
    assert graphed._failed and len(calls) == 4  # one warm-up, then each call ran the function itself
