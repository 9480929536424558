"""The per-epoch work of `train`, kept small: one checkpoint file per state (hard links),
--keep-epochs, loss.png redrawn at most every few seconds, validation kept on the device."""
import json
import os

import numpy as np
import pytest

from cryokern import checkpoint
from cryokern import train as T
from cryokern.step import TrainStep
from test_train import TINY, data_args, make_pair, metrics, npz

RUN = TINY + ["--batch-size", "4", "--val-fraction", "0.3"]


def run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    assert T.main(data_args(make_pair(tmp_path)) + RUN + ["--out", str(out)] + list(extra)) == 0
    return out


def test_several_names_are_one_file_written_once(tmp_path):
    paths = [tmp_path / n for n in ("epoch_0001.npz", "best.npz", "last.npz")]
    checkpoint.write(paths, b"state one")
    assert [p.read_bytes() for p in paths] == [b"state one"] * 3
    assert len({p.stat().st_ino for p in paths}) == 1
    checkpoint.write(paths[1:], b"state two")         # renamed over: the old file is intact
    assert paths[0].read_bytes() == b"state one"
    assert paths[2].read_bytes() == b"state two"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_a_failed_write_leaves_the_old_files_and_no_temporaries(tmp_path, monkeypatch):
    paths = [tmp_path / "best.npz", tmp_path / "last.npz"]
    checkpoint.write(paths, b"old")
    replace = os.replace

    def fail_on_last(src, dst):
        if str(dst).endswith("last.npz"):
            raise OSError(28, "No space left on device")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", fail_on_last)
    with pytest.raises(OSError):
        checkpoint.write(paths, b"new")
    assert paths[0].read_bytes() == b"new" and paths[1].read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.npz", "last.npz"]


def test_without_hard_links_each_name_gets_a_copy(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    checkpoint.write(paths, b"data")
    assert [p.read_bytes() for p in paths] == [b"data"] * 2
    assert paths[0].stat().st_ino != paths[1].stat().st_ino


def test_one_serialization_per_epoch_and_best_is_the_best_epoch(tmp_path, monkeypatch):
    encoded = []
    encode = checkpoint.encode
    monkeypatch.setattr(checkpoint, "encode", lambda *a: encoded.append(1) or encode(*a))
    out = run(tmp_path, "--epochs", "4", "--lr", "0.05")
    assert len(encoded) == 4
    records = metrics(out)
    best = min(records, key=lambda r: r["val_mse"])["epoch"]
    assert (out / "best.npz").read_bytes() == (out / f"epoch_{best:04d}.npz").read_bytes()
    assert (out / "last.npz").read_bytes() == (out / "epoch_0004.npz").read_bytes()
    meta = json.loads(str(npz(out / "best.npz")["meta"]))
    assert meta["epoch"] == best and meta["best_mse"] == records[best - 1]["val_mse"]


def test_keep_epochs_keeps_the_newest_files(tmp_path):
    out = run(tmp_path, "--epochs", "4", "--keep-epochs", "2")
    assert sorted(p.name for p in out.glob("epoch_*.npz")) == ["epoch_0003.npz", "epoch_0004.npz"]
    assert (out / "last.npz").read_bytes() == (out / "epoch_0004.npz").read_bytes()
    assert "layers.0.weight" in npz(out / "best.npz")      # a link outlives its epoch file


def test_keep_epochs_must_not_be_negative(tmp_path, capsys):
    assert T.main(data_args(make_pair(tmp_path)) + RUN + ["--out", str(tmp_path / "r"),
                                                          "--keep-epochs", "-1"]) == 2
    assert "--keep-epochs" in capsys.readouterr().err


@pytest.mark.parametrize("every, drawn", [(1e9, [2]), (0.0, [0, 1, 2])])
def test_the_plot_is_redrawn_at_most_every_few_seconds_and_at_the_end(tmp_path, monkeypatch,
                                                                     every, drawn):
    calls = []
    monkeypatch.setattr(T, "PLOT_EVERY_S", every)
    monkeypatch.setattr(T, "plot_losses", lambda out: calls.append(len(metrics(out)) - 1))
    run(tmp_path, "--epochs", "3")
    assert calls == drawn


def test_validation_kept_on_the_device_changes_no_bit(tmp_path, monkeypatch):
    kept = run(tmp_path, "--epochs", "3", name="kept")
    monkeypatch.setattr(T, "VAL_KEPT_BYTES", 0)           # read from the files every epoch
    streamed = run(tmp_path, "--epochs", "3", name="streamed")
    timing = ("images_per_s", "peak_rss_mib")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]
    assert strip(metrics(kept)) == strip(metrics(streamed))
    a, b = npz(kept / "last.npz"), npz(streamed / "last.npz")
    for k in a:
        if k != "meta":
            assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)), k


def test_epochs_overlap_and_each_epoch_file_is_that_epochs_state(tmp_path, monkeypatch):
    """An epoch's end is written once the next epoch's first step is queued, and its file
    holds the state at the epoch's end all the same: a run of 2 epochs ends with the bits
    (and meta) of the 3-epoch run's epoch_0002.npz."""
    events = []
    launch, finish = TrainStep.launch, T.Run.finish_epoch
    monkeypatch.setattr(TrainStep, "launch",
                        lambda self, *a: events.append(("step", self.step)) or launch(self, *a))

    def finish_epoch(self):
        if self._ending is not None:
            events.append(("end", self._ending.epoch + 1))
        return finish(self)
    monkeypatch.setattr(T.Run, "finish_epoch", finish_epoch)
    three = run(tmp_path, "--epochs", "3", name="three")
    steps = len([e for e in events if e[0] == "step"]) // 3        # an epoch's steps
    assert events.index(("end", 1)) == events.index(("step", steps)) + 1
    assert events.index(("end", 2)) == events.index(("step", 2 * steps)) + 1
    assert events[-1] == ("end", 3)
    two = run(tmp_path, "--epochs", "2", name="two")
    a, b = npz(three / "epoch_0002.npz"), npz(two / "last.npz")
    assert sorted(a) == sorted(b)
    for k in a:
        if k != "meta":
            assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)), k
    meta_a, meta_b = (json.loads(str(z["meta"])) for z in (a, b))
    for key in ("step", "position", "partial", "best_mse", "epoch"):
        assert meta_a[key] == meta_b[key], key
    assert meta_a["position"] == {"epoch": 2, "batch": 0}


def test_an_interrupt_before_the_next_epochs_first_step_writes_the_queued_epoch_end(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C while the next epoch waits for its first batch: the epoch's end, queued, is
    written before the run stops, and the run resumes from it."""
    batches = T.Run.training_batches

    def interrupted(self, epoch, first):
        if epoch == 1:
            raise KeyboardInterrupt
        return batches(self, epoch, first)
    with monkeypatch.context() as m:
        m.setattr(T.Run, "training_batches", interrupted)
        out = tmp_path / "run"
        assert T.main(data_args(make_pair(tmp_path)) + RUN + ["--out", str(out),
                                                              "--epochs", "2"]) == 130
    assert "--resume" in capsys.readouterr().err
    assert [r["epoch"] for r in metrics(out)] == [1]
    meta = json.loads(str(npz(out / "last.npz")["meta"]))
    assert meta["position"] == {"epoch": 1, "batch": 0}
    assert (out / "last.npz").read_bytes() == (out / "epoch_0001.npz").read_bytes()
    assert T.main(["--resume", "--out", str(out)]) == 0
    assert [r["epoch"] for r in metrics(out)] == [1, 2]


def test_a_failed_checkpoint_write_stops_the_run_with_its_error(tmp_path, monkeypatch):
    """Writes run behind training (up to WRITES_IN_FLIGHT queued): a failed one is raised at
    a later save, the run stops, and the files written before it stay whole."""
    write, calls = checkpoint.write, []

    def fail_third(paths, data):
        calls.append(paths[0].name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        write(paths, data)
    monkeypatch.setattr(checkpoint, "write", fail_third)
    with pytest.raises(OSError, match="No space"):
        run(tmp_path, "--epochs", "8")
    out = tmp_path / "run"
    assert calls[2] == "epoch_0003.npz" and not (out / "epoch_0003.npz").exists()
    assert len(calls) <= 2 + T.WRITES_IN_FLIGHT + 1 < 8
    assert json.loads(str(npz(out / "epoch_0002.npz")["meta"]))["step"] > 0
    assert not list(out.glob(".tmp-*"))


def test_epochs_run_one_by_one_beyond_the_options_get_their_batches(tmp_path):
    """bench/quality.py's loop: Run.train_epoch epoch after epoch, past --epochs; each runs
    its own batches (a new loader once the run's covers no more epochs)."""
    opts = T.build_parser().parse_args(data_args(make_pair(tmp_path)) + RUN + [
        "--epochs", "1", "--out", str(tmp_path / "r")])
    run = T.start(opts, set())
    try:
        for epoch in range(3):
            run.train_epoch(epoch)
            assert run.position == {"epoch": epoch, "batch": 2} and run.step.step == 2 * epoch + 2
            run.position, run.meter = {"epoch": epoch + 1, "batch": 0}, T.LossMeter()
    finally:
        run.close_loader()
