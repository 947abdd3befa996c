"""logger: file outputs, tensor means without host syncs, TensorBoard, ranks."""

import csv
import glob
import json
import os

import numpy as np
import pytest
import torch

from guided_diffusion_vae.runtime import dist_util, logger


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE",
                 "OPENAI_LOGDIR", "OPENAI_LOG_FORMAT", "OPENAI_LOG_FORMAT_MPI"):
        monkeypatch.delenv(name, raising=False)
    dist_util.cleanup()
    yield
    current = logger.Logger.CURRENT
    if current is not None and current is not logger.Logger.DEFAULT:
        current.close()
    logger.Logger.CURRENT = logger.Logger.DEFAULT = None


def test_csv_json_log_outputs(tmp_path, capsys):
    logger.configure(dir=str(tmp_path), format_strs=["stdout", "log", "csv", "json"])
    assert logger.get_dir() == str(tmp_path)
    logger.logkv("step", 1)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 2.0)
    first = logger.dumpkvs()
    assert first == {"step": 1, "loss": 1.5}
    logger.logkv("step", 2)
    logger.logkv("loss", 0.25)
    logger.logkv("lr", 1e-4)  # new column
    logger.dumpkvs()
    logger.log("hello", 42)
    logger.set_level(logger.WARN)
    logger.info("hidden message")
    logger.warn("visible warning")

    with open(tmp_path / "progress.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["step", "loss", "lr"]
    assert rows[1] == ["1", "1.5", ""]
    assert rows[2] == ["2", "0.25", "0.0001"]

    lines = (tmp_path / "progress.json").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 1.5},
        {"step": 2, "loss": 0.25, "lr": 0.0001},
    ]

    text = (tmp_path / "log.txt").read_text()
    assert "hello 42" in text and "visible warning" in text and "hidden message" not in text
    assert "| loss" in text and "1.5" in text
    assert "hello 42" in capsys.readouterr().out


def test_logdir_from_environment(tmp_path, monkeypatch):
    target = tmp_path / "from_env"
    monkeypatch.setenv("OPENAI_LOGDIR", str(target))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "log,csv")
    logger.configure()
    logger.logkv("a", 3)
    logger.dumpkvs()
    assert logger.get_dir() == str(target)
    assert (target / "log.txt").exists() and (target / "progress.csv").read_text().startswith("a")


def test_tensor_means_stay_on_device_until_dump(tmp_path, monkeypatch):
    logger.configure(dir=str(tmp_path), format_strs=["json"])
    values = [torch.tensor(v, requires_grad=True) * 1.0 for v in (1.0, 2.0, 4.5)]

    def no_sync(*args, **kwargs):
        raise AssertionError("logkv_mean read a tensor back to the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__"):
            patch.setattr(torch.Tensor, name, no_sync)
        for v in values:
            logger.logkv_mean("loss", v)
        logger.logkv_mean("loss", 0.5)  # floats mix with tensors
        logger.logkv_mean("other", torch.tensor(3, dtype=torch.int32))
        logger.logkv("last", torch.tensor(7.0))
    out = logger.dumpkvs()
    assert out["loss"] == pytest.approx((1.0 + 2.0 + 4.5 + 0.5) / 4)
    assert out["other"] == pytest.approx(3.0)
    assert out["last"] == pytest.approx(7.0)
    assert all(isinstance(v, float) for v in out.values())
    # the next interval starts empty
    logger.logkv_mean("loss", torch.tensor(10.0))
    assert logger.dumpkvs() == {"loss": 10.0}
    with pytest.raises(ValueError, match="scalar"):
        logger.logkv_mean("bad", torch.ones(3))


def test_tensorboard_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger.configure(dir=str(tmp_path), format_strs="csv,tensorboard")
    for step in (10, 20):
        logger.logkv_mean("loss", torch.tensor(float(step)))
        logger.logkv("note", "text is skipped by tensorboard")
        logger.dumpkvs(step=step)
    logger.log_scalar("eval/fid", 12.5, step=20)
    grid = np.zeros((4, 3, 8, 8), dtype=np.uint8)
    grid[:, 0] = 255  # red images
    logger.log_image("samples", grid, step=20)
    logger.log_image("single", np.full((6, 5, 3), 128, dtype=np.uint8), step=3)
    logger.get_current().close()
    logger.Logger.CURRENT = None

    events = glob.glob(os.path.join(str(tmp_path), "tb", "events.out.tfevents.*"))
    assert events, os.listdir(tmp_path)
    acc = EventAccumulator(os.path.join(str(tmp_path), "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(10, 10.0), (20, 20.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/fid")] == [(20, 12.5)]
    image = acc.Images("samples")[0]
    assert image.step == 20
    # 4 images of 8x8 on a 2x2 grid with 2-pixel gaps
    assert (image.height, image.width) == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    assert acc.Images("single")[0].height == 6


def test_nonzero_rank_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logdir = tmp_path / "r1"
    logger.configure(dir=str(logdir), format_strs=["stdout", "log", "csv"])
    logger.logkv("loss", 1.0)
    logger.dumpkvs()
    logger.log("rank one says hi")
    logger.error("rank one failed")
    assert not logdir.exists() or not os.listdir(logdir)
    captured = capsys.readouterr()
    assert "hi" not in captured.out
    assert "[rank 1] rank one failed" in captured.err

    # opting in gives suffixed files
    monkeypatch.setenv("OPENAI_LOG_FORMAT_MPI", "log")
    logger.configure(dir=str(logdir))
    logger.log("now logged")
    assert "now logged" in (logdir / "log-rank001.txt").read_text()


def test_profile_kv_and_image_shapes(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["json"])
    with logger.profile_kv("io"):
        pass
    out = logger.dumpkvs()
    assert out["wait_io"] >= 0.0
    hwc = logger._image_to_hwc_uint8(torch.rand(2, 3, 4, 5))
    assert hwc.dtype == np.uint8 and hwc.shape == (4 + 4, 2 * 5 + 3 * 2, 3)
    assert logger._image_to_hwc_uint8(np.zeros((1, 7, 9))).shape == (7, 9, 1)


def test_scoped_configure_restores_the_outer_logger(tmp_path):
    logger.configure(dir=str(tmp_path / "outer"), format_strs=["log"])
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["log"]):
        logger.log("inside")
    logger.log("outside again")
    assert "inside" in (tmp_path / "inner" / "log.txt").read_text()
    outer_text = (tmp_path / "outer" / "log.txt").read_text()
    assert "outside again" in outer_text and "inside" not in outer_text


def test_quiet_configure_leaves_out_where_it_logs(tmp_path, capsys):
    logger.configure(dir=str(tmp_path / "outer"), format_strs="stdout,log")
    with logger.quiet_configure():
        logger.configure(dir=str(tmp_path / "stage"), format_strs="stdout,log")
        with logger.scoped_configure(str(tmp_path / "inner"), format_strs="stdout,log"):
            logger.log("inside")
    logger.configure(dir=str(tmp_path / "after"), format_strs="stdout,log")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Logging to")]
    assert printed == [f"Logging to {tmp_path / 'outer'}", f"Logging to {tmp_path / 'after'}"]
    assert (tmp_path / "inner" / "log.txt").read_text() == "inside\n"


def test_csv_of_a_resumed_run_keeps_the_earlier_rows(tmp_path):
    import csv

    from guided_diffusion_vae.runtime.logger import CSVOutput

    path = str(tmp_path / "progress.csv")
    first = CSVOutput(path)
    first.writekvs({"step": 1, "loss": 0.5})
    first.writekvs({"step": 2, "loss": 0.4})
    first.close()
    again = CSVOutput(path)  # the resumed run opens the same table
    again.writekvs({"step": 3, "loss": 0.3, "loss_q0": 0.9})  # and adds a column
    again.close()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [r["loss_q0"] for r in rows] == ["", "", "0.9"]
