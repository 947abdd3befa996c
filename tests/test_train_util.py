"""The training loop: resume equals uninterrupted, non-finite steps, checkpoints."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from guided_diffusion_vae.training import checkpoint as ckpt
from guided_diffusion_vae.runtime import logger
from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.data.batching import BatchStream, ShardedBatchSampler
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.training.train_util import DeviceMeans, TrainLoop
from guided_diffusion_vae.training.ema import ema_decay
from guided_diffusion_vae.core.script_util import split_flags


def _stream(seed=0, n=24, batch=4, interrupt_at=None):
    gen = torch.Generator().manual_seed(123)
    data = torch.randn(n, 4, 8, 8, generator=gen)
    labels = torch.arange(n) % 3

    def batches(sampler):
        for k, idx in enumerate(sampler, start=sampler.start):
            if k == interrupt_at:  # a cluster's preemption, as the loop sees it
                os.kill(os.getpid(), signal.SIGTERM)
            yield data[idx], {"y": labels[idx]}

    return BatchStream(ShardedBatchSampler(n, batch, seed=seed), batches)


def _loop(flags, folder, steps, resume="", interrupt_at=None, save_interval=0, extra_meta=None, **kw):
    torch.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    model_config, diffusion_config = split_flags(flags)
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=_stream(interrupt_at=interrupt_at), batch_size=4, microbatch=2, lr=1e-3,
        ema_rate="0.9,0.99", log_interval=2, save_interval=save_interval, resume_checkpoint=resume,
        lr_anneal_steps=steps, checkpoint_dir=str(folder), weight_decay=0.01, grad_clip=1.0,
        metadata={"model": model_config, "diffusion": diffusion_config, "data": {"label_map": {"0": "a", "1": "b", "2": "c"}},
                  **(extra_meta or {})},
        **kw,
    )
    return loop


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_model_flags):
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    straight = _loop(tiny_model_flags, tmp_path / "a", 6)
    straight.run_loop()

    first = _loop(tiny_model_flags, tmp_path / "b", 6, interrupt_at=2)
    path = first.run_loop()  # SIGTERM during step 3: save and return
    assert os.path.basename(path) == "model000003.safetensors"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    torch.manual_seed(999)  # the resumed run must not depend on the fresh process's RNG
    second = _loop(tiny_model_flags, tmp_path / "b", 6, resume=path)
    assert second.step == 3
    second.run_loop()

    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    for ema_a, ema_b in zip(straight.ema_params, second.ema_params):
        for a, b in zip(ema_a, ema_b):
            assert torch.equal(a, b)
    # The run changed the weights (so equality above is not trivial).
    fresh = _loop(tiny_model_flags, tmp_path / "c", 6)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.model.parameters(), second.model.parameters()))


def test_checkpoint_describes_itself(tmp_path, tiny_model_flags):
    logger.configure(dir=str(tmp_path), format_strs="log")
    path = _loop(tiny_model_flags, tmp_path, 2).run_loop()
    state, meta = ckpt.load_weights(path)
    assert meta["step"] == 2 and meta["weights"] == "model"
    assert meta["model"]["in_channels"] == 4 and meta["model"]["num_classes"] == 3
    assert meta["data"]["label_map"] == {"0": "a", "1": "b", "2": "c"}
    ema_state, ema_meta = ckpt.load_weights(ckpt.ema_path(str(tmp_path), 0.99, 2))
    assert ema_meta["weights"] == "ema_0.99"
    rebuilt = script_util.create_model(**meta["model"])
    rebuilt.load_state_dict(ema_state, strict=True)


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, tiny_model_flags):
    logger.configure(dir=str(tmp_path), format_strs="log,csv")
    loop = _loop(tiny_model_flags, tmp_path, 20, max_nonfinite_steps=3)
    loop.log_interval = 1
    loop.run_loop.__func__  # noqa: B018 (the loop object is used below)
    poisoned = {"on": False}
    real = loop.diffusion.training_losses

    def losses(model, x, t, model_kwargs=None, noise=None):
        out = real(model, x, t, model_kwargs=model_kwargs, noise=noise)
        if poisoned["on"]:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    loop.diffusion.training_losses = losses
    batch, cond = next(loop.data)
    loop.run_step(batch, cond)  # one good step
    before = [p.detach().clone() for p in loop.model.parameters()]
    ema_before = [p.clone() for p in loop.ema_params[0]]
    poisoned["on"] = True
    loop.run_step(batch, cond)
    assert all(torch.equal(a, b) for a, b in zip(before, loop.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, loop.ema_params[0]))
    assert loop.opt.state[loop.params[0]]["step"].item() == 1  # the skipped step did not count
    with pytest.raises(UserError, match=r"steps in a row had a non-finite loss.*try a lower lr"):
        loop.run_loop()
    assert loop.step <= 4


def test_non_finite_steps_stop_training_between_log_steps(tmp_path, tiny_model_flags):
    """Issue 21: the count of non-finite steps in a row was read only at log
    steps, so with log_interval 1000 a run went on far past the limit."""
    logger.configure(dir=str(tmp_path), format_strs="log")
    loop = _loop(tiny_model_flags, tmp_path, 50, max_nonfinite_steps=3)
    loop.log_interval = 1000
    real = loop.diffusion.training_losses

    def losses(model, x, t, model_kwargs=None, noise=None):
        out = real(model, x, t, model_kwargs=model_kwargs, noise=noise)
        return {k: v * float("nan") for k, v in out.items()}

    loop.diffusion.training_losses = losses
    with pytest.raises(UserError, match=r"3 steps in a row had a non-finite loss .*\(step 3\)"):
        loop.run_loop()
    assert loop.step == 3
    assert os.path.exists(ckpt.model_path(str(tmp_path), 3))  # saved before stopping


def test_strict_loading_names_parameters_and_config(tmp_path, tiny_model_flags):
    model, _ = script_util.create_model_and_diffusion(**tiny_model_flags)
    model_config, _ = split_flags(tiny_model_flags)
    path = str(tmp_path / "m.safetensors")
    ckpt.save_weights(path, model.state_dict(), {"model": model_config})
    other_flags = dict(tiny_model_flags, class_cond=False, in_channels=3)
    other, _ = script_util.create_model_and_diffusion(**other_flags)
    state, meta = ckpt.load_weights(path)
    with pytest.raises(UserError) as err:
        ckpt.load_state_strict(other, state, path, meta["model"], split_flags(other_flags)[0])
    text = str(err.value)
    assert "unexpected: label_emb.weight" in text
    assert "input_blocks.0.0.weight checkpoint [32, 4, 3, 3] vs model [32, 3, 3, 3]" in text
    assert "class_cond=True in the checkpoint, False here" in text
    assert "in_channels=4 in the checkpoint, 3 here" in text
    # Without configs the parameter names still point at the cause.
    with pytest.raises(UserError, match="class_cond differs.*in_channels differs"):
        ckpt.load_state_strict(other, state, path)


def test_killed_write_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "model000001.safetensors"
    script = textwrap.dedent(f"""
        import sys, time, torch
        from guided_diffusion_vae import checkpoint as ckpt, files
        ckpt.save_weights({str(path)!r}, {{"w": torch.ones(1000)}}, {{"step": 1}})
        def slow(tmp):
            with open(tmp, "wb") as f:
                f.write(b"partial" * 1000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
        files.atomic_write({str(path)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state, meta = ckpt.load_weights(str(path))
    assert torch.equal(state["w"], torch.ones(1000)) and meta["step"] == 1


def test_bare_pt_state_dicts_load_without_unpickling_code(tmp_path, tiny_model_flags):
    model, _ = script_util.create_model_and_diffusion(**tiny_model_flags)
    path = str(tmp_path / "model000100.pt")
    torch.save(model.state_dict(), path)
    state, meta = ckpt.load_weights(path)
    assert meta is None and set(state) == set(model.state_dict())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, str(tmp_path / "evil.pt"))
    with pytest.raises(UserError, match="cannot read checkpoint .*evil.pt"):
        ckpt.load_weights(str(tmp_path / "evil.pt"))


def test_resume_refuses_other_data_a_latent_scale_and_an_ema_file(tmp_path, tiny_model_flags):
    """Issue 21 B8: resuming with other people's classes or another latent
    scale, or from an EMA file, is refused naming the difference."""
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    vae = {"latent_scale": 0.18, "fingerprint": "f"}
    path = _loop(tiny_model_flags, tmp_path, 2, extra_meta={"vae": vae}).run_loop()
    others = {"label_map": {"0": "a", "1": "x", "2": "c"}}
    with pytest.raises(UserError, match=r"trained with data.label_map class 1 = 'b', this run's data has 'x'"):
        _loop(tiny_model_flags, tmp_path, 4, resume=path, extra_meta={"vae": vae, "data": others})
    with pytest.raises(UserError, match=r"trained with vae.latent_scale 0.18, this run's data has 0.2"):
        _loop(tiny_model_flags, tmp_path, 4, resume=path, extra_meta={"vae": {**vae, "latent_scale": 0.2}})
    ema = ckpt.ema_path(str(tmp_path), 0.9, 2)
    with pytest.raises(UserError, match=r"ema_0.9_000002.safetensors is an EMA file; a resume starts from the model"):
        _loop(tiny_model_flags, tmp_path, 4, resume=ema, extra_meta={"vae": vae})
    assert _loop(tiny_model_flags, tmp_path, 4, resume=path, extra_meta={"vae": vae}).step == 2


@pytest.mark.parametrize("with_opt", [True, False])
def test_an_original_pt_checkpoint_resumes(with_opt, tmp_path, tiny_model_flags):
    """The original guided-diffusion's files: a bare ``modelNNNNNN.pt`` and,
    maybe, its ``optNNNNNN.pt`` (a plain optimizer state dict) once gave
    ``KeyError: 'optimizer'``; now weights and optimizer state are taken."""
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    trained = _loop(tiny_model_flags, tmp_path / "ours", 2)
    trained.run_loop()
    original = tmp_path / "original"
    original.mkdir()
    torch.save(trained.model.state_dict(), original / "model000002.pt")
    if with_opt:  # the original's whole set: EMA files and the optimizer's state dict
        for i, rate in enumerate(("0.9", "0.99")):
            torch.save(trained.ema_state_dict(i), original / f"ema_{rate}_000002.pt")
        torch.save(trained.opt.state_dict(), original / "opt000002.pt")
    resumed = _loop(tiny_model_flags, tmp_path / "run", 3, resume=str(original / "model000002.pt"))
    assert resumed.step == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), trained.model.parameters()))
    ema = trained.ema_params[0] if with_opt else [p.float() for p in trained.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema_params[0], ema))
    moments = [resumed.opt.state.get(p, {}).get("exp_avg") for p in resumed.params]
    if with_opt:
        assert all(torch.equal(m, trained.opt.state[q]["exp_avg"]) for m, q in zip(moments, trained.params))
    else:
        assert all(m is None for m in moments)
    resumed.run_loop()
    assert resumed.step == 3


def test_device_means_average_without_host_values():
    means = DeviceMeans()
    means.add("loss", torch.tensor([1.0, 3.0]))
    means.add("loss", torch.tensor([5.0]))
    means.add_by_quarter("mse", torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 10, 99]), 100)
    out = means.pop()
    assert out["loss"] == pytest.approx(3.0)
    assert out["mse_q0"] == pytest.approx(1.5) and out["mse_q3"] == pytest.approx(4.0)
    assert "mse_q1" not in out and means.pop() == {}


def test_original_fp16_scheme_trains_and_saves_float32_weights(tmp_path, tiny_model_flags):
    logger.configure(dir=str(tmp_path), format_strs="log")
    loop = _loop(tiny_model_flags, tmp_path, 3, use_fp16=True)
    before = [p.detach().float().clone() for p in loop.model.parameters()]
    assert loop.model.dtype == torch.float16 and loop.mp_trainer.lg_loss_scale == 20.0
    path = loop.run_loop()
    state, meta = ckpt.load_weights(path)
    assert {v.dtype for v in state.values()} == {torch.float32} and meta["step"] == 3
    moved = [not torch.equal(a, b.float()) for a, b in zip(before, loop.model.parameters())]
    assert any(moved)


def test_loss_aware_sampler_learns_from_the_loop_and_resumes(tmp_path, tiny_model_flags):
    from guided_diffusion_vae.core.resample import create_named_schedule_sampler

    logger.configure(dir=str(tmp_path), format_strs="log")
    flags = dict(tiny_model_flags, diffusion_steps=25)
    loop = _loop(flags, tmp_path, 4)
    sampler = create_named_schedule_sampler("loss-second-moment", loop.diffusion)
    loop.schedule_sampler, loop._loss_aware = sampler, True
    path = loop.run_loop()
    state = ckpt.load_training_state(ckpt.state_path(str(tmp_path), 4))
    assert "schedule_sampler" in state  # its history survives a restart
    assert path.endswith("model000004.safetensors")
    # 4 steps x 4 images recorded losses for the timesteps drawn
    assert 0 < int((sampler._loss_counts > 0).sum()) <= 16


def test_ema_warmup_tracks_early_weights_and_can_be_turned_off(tmp_path, tiny_model_flags):
    logger.configure(dir=str(tmp_path), format_strs="log")
    loop = _loop(tiny_model_flags, tmp_path, 3)
    assert ema_decay(0.9999, 0) == pytest.approx(0.1)  # step 0: (1 + 0) / (10 + 0)
    assert ema_decay(0.9999, 1000) == pytest.approx(1001 / 1010) and ema_decay(0.9, 1000) == 0.9
    assert ema_decay(0.9999, 0, warmup=False) == 0.9999
    init = [p.detach().clone() for p in loop.model.parameters()]
    batch, cond = next(loop.data)
    loop.run_step(batch, cond)
    for ema, p, p0 in zip(loop.ema_params[0], loop.model.parameters(), init):
        torch.testing.assert_close(ema, 0.1 * p0 + 0.9 * p.detach())
    original = _loop(tiny_model_flags, tmp_path / "o", 3, ema_warmup=False)
    init = [p.detach().clone() for p in original.model.parameters()]
    batch, cond = next(original.data)
    original.run_step(batch, cond)
    for ema, p, p0 in zip(original.ema_params[0], original.model.parameters(), init):  # rate 0.9 from step 0
        torch.testing.assert_close(ema, 0.9 * p0 + 0.1 * p.detach())


def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path, tiny_model_flags):
    logger.configure(dir=str(tmp_path), format_strs="log")
    fresh = _loop(tiny_model_flags, tmp_path / "empty", 2, resume="auto")
    assert fresh.step == 0  # nothing to resume: starts at step 0, says so in the log
    _loop(tiny_model_flags, tmp_path, 2).run_loop()
    loop = _loop(tiny_model_flags, tmp_path, 4, resume="auto")
    assert loop.step == 2
    # A model file without its training state (a crash between the two writes) is not resumable.
    (tmp_path / "model000009.safetensors").write_bytes((tmp_path / "model000002.safetensors").read_bytes())
    assert _loop(tiny_model_flags, tmp_path, 4, resume="auto").step == 2


def test_atomic_writes_respect_the_umask_and_clear_stale_temporaries(tmp_path):
    import time

    from guided_diffusion_vae.runtime.files import atomic_write_bytes

    stale = tmp_path / ".data.bin.abc123.tmp"  # left by a writer killed mid-save
    stale.write_bytes(b"")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / ".data.bin.def456.tmp"  # a writer that may still be alive
    fresh.write_bytes(b"")
    previous = os.umask(0o027)
    try:
        atomic_write_bytes(str(tmp_path / "data.bin"), b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "data.bin").stat().st_mode & 0o777 == 0o640
    assert not stale.exists() and fresh.exists()


def test_one_json_writer_for_every_json_file(tmp_path):
    """atomic_write_json: a final newline, keys sorted unless asked not to,
    and with allow_nan=False a non-finite value writes nothing at all."""
    import json

    from guided_diffusion_vae.runtime.files import atomic_write_json

    path = tmp_path / "a.json"
    atomic_write_json(str(path), {"b": 1, "a": [1.5, None]})
    assert path.read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    atomic_write_json(str(path), {"b": 1, "a": 2}, indent=None, sort_keys=False)
    assert path.read_text() == '{"b": 1, "a": 2}\n'
    with pytest.raises(ValueError):
        atomic_write_json(str(tmp_path / "nan.json"), {"fd": float("nan")}, allow_nan=False)
    assert sorted(os.listdir(tmp_path)) == ["a.json"]
    assert json.loads(path.read_text()) == {"b": 1, "a": 2}


def _steps_on_disk(folder):
    """``{step: sorted names}`` of the checkpoint files in ``folder``."""
    found = {}
    for name in os.listdir(folder):
        if name.endswith((".safetensors", ".pt")):
            found.setdefault(ckpt.parse_step(name), []).append(name)
    return {step: sorted(names) for step, names in found.items()}


def test_keep_checkpoints_prunes_old_saves_and_resume_continues_from_the_newest(tmp_path, tiny_model_flags):
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    folder = tmp_path / "run"
    _loop(tiny_model_flags, folder, 5, save_interval=1, keep_checkpoints=2).run_loop()
    # Steps 4 and 5 remain, each with its model, both EMAs and its training state.
    assert _steps_on_disk(folder) == {
        step: sorted([f"model{step:06d}.safetensors", f"ema_0.9_{step:06d}.safetensors",
                      f"ema_0.99_{step:06d}.safetensors", f"opt{step:06d}.pt"]) for step in (4, 5)}

    # A torn save of a later step (model written, no training state) and a
    # file of the original's format: neither is pruned, and resume skips the torn one.
    (folder / "model000090.safetensors").write_bytes((folder / "model000005.safetensors").read_bytes())
    (folder / "model000001.pt").write_bytes(b"the original's checkpoint")
    resumed = _loop(tiny_model_flags, folder, 8, resume="auto", save_interval=1, keep_checkpoints=2)
    assert resumed.step == 5
    resumed.run_loop()
    assert sorted(_steps_on_disk(folder)) == [1, 7, 8, 90]
    assert len(_steps_on_disk(folder)[8]) == 4
    assert _loop(tiny_model_flags, folder, 9, resume="auto").step == 8

    # 0 keeps every save.
    _loop(tiny_model_flags, tmp_path / "all", 3, save_interval=1, keep_checkpoints=0).run_loop()
    assert sorted(_steps_on_disk(tmp_path / "all")) == [1, 2, 3]


def test_pruning_a_step_removes_its_training_state_first(tmp_path):
    # A crash part-way through pruning step 1 left its model and EMA but no
    # training state: it no longer counts as resumable, and the next prune
    # removes the rest.
    for name in ("model000001.safetensors", "ema_0.99_000001.safetensors",
                 "model000002.safetensors", "opt000002.pt", "model000003.safetensors", "opt000003.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert ckpt.latest_model_checkpoint(str(tmp_path)).endswith("model000003.safetensors")
    assert ckpt.prune_checkpoints(str(tmp_path), 1, current_step=3) == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["model000003.safetensors", "opt000003.pt"]


def test_ema_update_by_a_device_weight_matches_update():
    """The CUDA-graph VAE step moves its EMA by a weight tensor; it must be the
    same average as the eager update with the host decay."""
    from guided_diffusion_vae.training.ema import EMA, ema_decay

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    eager, graphed = EMA(model, 0.99), EMA(model, 0.99)
    for step in range(6):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        eager.update(model, step)
        graphed.update_by(model, torch.tensor(1 - ema_decay(0.99, step, True)))
    assert not torch.equal(eager.params[0], model.weight.detach())
    for a, b in zip(eager.params, graphed.params):
        torch.testing.assert_close(a, b)


def test_compiled_training_keeps_parameter_names_and_resumes(tmp_path, tiny_model_flags, monkeypatch):
    """--compile wraps the network for the step only: checkpoints keep the
    original's parameter names (no ``_orig_mod.`` prefix) and resume into a
    compiled or an uncompiled loop. (The eager backend keeps the test fast;
    naming and resume do not depend on the backend.)"""
    import functools

    from guided_diffusion_vae.training import training_parts

    monkeypatch.setattr(training_parts.torch, "compile", functools.partial(torch.compile, backend="eager"))
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    compiled = _loop(tiny_model_flags, tmp_path / "a", 4, compile=True)
    assert type(compiled.compiled_model).__name__ == "OptimizedModule"
    path = compiled.run_loop()
    names = set(ckpt.load_weights(path)[0].keys())
    model, _ = script_util.create_model_and_diffusion(**tiny_model_flags)
    assert names == set(model.state_dict().keys())
    assert not any(name.startswith("_orig_mod") for name in names)
    for compile_again in (True, False):
        resumed = _loop(tiny_model_flags, tmp_path / "a", 6, resume=path, compile=compile_again)
        assert resumed.step == 4
        resumed.run_loop()
        assert resumed.step == 6


class _CountingTrainer:
    """A trainer for ``train_until``: each step is counted; ``signal_at``
    sends this process a signal during that step."""

    device = torch.device("cpu")

    def __init__(self, step=0, signal_at=None, sig=signal.SIGTERM):
        self.step, self.signal_at, self.sig, self.saved = step, signal_at, sig, []

    def advance(self):
        self.step += 1
        if self.step == self.signal_at:
            os.kill(os.getpid(), self.sig)

    def save_now(self):
        self.saved.append(self.step)


def test_train_until_runs_to_the_total_and_saves_once_at_a_stop(tmp_path):
    from guided_diffusion_vae.training.training_parts import train_until

    default = logger.Logger.DEFAULT
    logger.configure(dir=str(tmp_path), format_strs="log")
    try:
        _check_train_until(train_until, tmp_path / "log.txt")
    finally:
        logger.close()
        logger.Logger.CURRENT = logger.Logger.DEFAULT = default


def _check_train_until(train_until, log):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    done = _CountingTrainer(step=2)
    assert train_until(done, 5, check_every=1) is True
    assert done.step == 5 and done.saved == []  # finishing saves, not the loop
    for sig in (signal.SIGTERM, signal.SIGINT):
        stopped = _CountingTrainer(signal_at=3, sig=sig)
        assert train_until(stopped, 10, check_every=2) is False
        assert stopped.step == 3 and stopped.saved == [3]  # one process: stops at once
        assert log.read_text().splitlines()[-1] == f"{sig.name} received: saved at step 3; rerun the same command " \
                                                   "to continue"
    last = _CountingTrainer(signal_at=4)
    assert train_until(last, 4, check_every=1) is True and last.saved == []  # a stop at the end just finishes
    forever = _CountingTrainer(signal_at=7)
    assert train_until(forever, 0, check_every=1) is False and forever.saved == [7]  # 0: until stopped
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the handlers are restored


def _no_tf32_convolutions(monkeypatch):
    """cuDNN runs float32 convolutions in TF32 by default (10-bit mantissas),
    and the two layouts take different algorithms: the comparisons across
    layouts below are about where elements lie, not TF32's rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def test_a_channels_last_run_trains_and_saves_as_a_contiguous_one(tmp_path, tiny_model_flags, monkeypatch):
    """nn.to_fast_layout (on a GPU with the fused norms: channels-last) only
    changes how the weights lie in memory: the same losses and weights, and
    the checkpoint loads into a plain model."""
    from guided_diffusion_vae.core import nn as gd_nn

    _no_tf32_convolutions(monkeypatch)
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    with gd_nn.channels_last(False):  # a GPU's default is channels-last
        plain = _loop(tiny_model_flags, tmp_path / "a", 3)
    assert plain.model.out[-1].weight.is_contiguous()
    plain.run_loop()
    with gd_nn.channels_last(True):
        last = _loop(tiny_model_flags, tmp_path / "b", 3)
    weights = [p for p in last.model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert sum(not p.is_contiguous() for p in weights) >= 4  # 1x1 kernels are both at once
    path = last.run_loop()
    # Adam divides by the gradients' size, so float rounding of the other
    # convolution order reaches the weights; one step moves them 1e-3.
    for a, b in zip(plain.model.parameters(), last.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    state, _ = ckpt.load_weights(path)
    fresh, _ = script_util.create_model_and_diffusion(**tiny_model_flags)
    fresh.load_state_dict(state)
    device = next(last.model.parameters()).device
    fresh.to(device)
    x, t, y = torch.randn(2, 4, 8, 8, device=device), torch.tensor([3, 7], device=device), torch.tensor([0, 2], device=device)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y=y), last.model(x, t, y=y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("saved_in, resumed_in", [(True, True), (False, True), (True, False)])
def test_a_run_resumes_exactly_whatever_layout_saved_and_resumed_it(tmp_path, tiny_model_flags, saved_in,
                                                                     resumed_in, monkeypatch):
    """A run saved channels-last (nn.to_fast_layout on a GPU) or in NCHW (an
    older version, a CPU) resumes in either layout exactly as it would have
    gone on. The fused AdamW kernel reads each state tensor as raw memory in
    its parameter's order, so a state left in the other layout would update
    the wrong elements: the loaded state and EMA take their parameter's
    layout."""
    from guided_diffusion_vae.core import nn as gd_nn

    _no_tf32_convolutions(monkeypatch)
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    with gd_nn.channels_last(resumed_in):
        straight = _loop(tiny_model_flags, tmp_path / "a", 6)
        straight.run_loop()
    with gd_nn.channels_last(saved_in):
        path = _loop(tiny_model_flags, tmp_path / "b", 6, interrupt_at=2).run_loop()
    with gd_nn.channels_last(resumed_in):
        second = _loop(tiny_model_flags, tmp_path / "b", 6, resume=path)
        assert second.step == 3
        for p in second.params:
            assert all(v.stride() == p.stride() for k, v in second.opt.state[p].items() if k != "step")
        for ema in second.ema_params:
            assert all(e.stride() == p.stride() for e, p in zip(ema, second.params))
        second.run_loop()
    # Across layouts the first steps' convolutions round differently (Adam
    # carries that to ~1e-5); a state applied to the wrong elements moves
    # weights by the learning rate, 1e-3 a step.
    same = saved_in == resumed_in
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0 if same else 1e-3, atol=0 if same else 1e-4)
    for ema_a, ema_b in zip(straight.ema_params, second.ema_params):
        for a, b in zip(ema_a, ema_b):
            torch.testing.assert_close(a, b, rtol=0 if same else 1e-3, atol=0 if same else 1e-4)
