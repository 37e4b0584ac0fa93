"""Audit item 6: secure noise cannot be replayed, so a secure DP-SGD run checkpoints every
epoch whatever --checkpoint-every says, and the loop reports an epoch only after its
checkpoint: nothing it showed is redone (with fresh noise) by a resume."""

from __future__ import annotations

import json

import pytest
import torch

from labeldp.runner import Environment, RunConfig, train_run
from labeldp.train import TrainConfig, loop

pytestmark = pytest.mark.fake_fashion(n_train=300, n_test=50)


def _config(*, secure, lr=0.5):
    return RunConfig(
        dataset="fashion-mnist",
        train=TrainConfig(epochs=3, batch_size=50, lr=lr),
        method="dp-sgd",
        method_options={"epsilon": 8.0, "accountant": "rdp", "secure_noise": secure},
        norm="group",
        model="cnn-tanh",
        crop_padding=0,
    )


def _run(data_dir, out, *, secure, resume=False, progress=False):
    config = _config(secure=secure)
    env = Environment(data_dir=str(data_dir), download=False, progress=progress,
                      checkpoint_every=5)  # fmt: skip
    return train_run(config, out, env, resume=resume)


def _interrupt_at(monkeypatch, stop_epoch):
    original = loop.Trainer._train_epoch

    def interrupt(self, epoch):
        if epoch == stop_epoch:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(loop.Trainer, "_train_epoch", interrupt)
    return original


@pytest.mark.parametrize("secure, checkpointed", [(True, 2), (False, None)])
def test_a_secure_run_checkpoints_every_epoch(
    data_dir, tmp_path, monkeypatch, secure, checkpointed
):
    out = tmp_path / "run"
    original = _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, out, secure=secure)
    ckpt = out / "train.ckpt"
    if checkpointed is None:  # seeded noise replays exactly: --checkpoint-every holds
        assert not ckpt.exists()
    else:
        assert torch.load(ckpt, weights_only=True)["epochs_done"] == checkpointed
        monkeypatch.setattr(loop.Trainer, "_train_epoch", original)
        metrics = _run(data_dir, out, secure=secure, resume=True)
        assert metrics.resumed_from_epoch == 2


def test_an_epoch_is_reported_only_after_its_checkpoint(data_dir, tmp_path, monkeypatch):
    events = []
    save, report = loop.Trainer.save_checkpoint, loop.Trainer._report_epoch

    def saving(self, path):
        events.append(("save", self.epochs_done))
        return save(self, path)

    def reporting(self):
        events.append(("report", self.epochs_done))
        return report(self)

    monkeypatch.setattr(loop.Trainer, "save_checkpoint", saving)
    monkeypatch.setattr(loop.Trainer, "_report_epoch", reporting)
    _run(data_dir, tmp_path / "run", secure=True, progress=True)
    assert events == [(kind, e) for e in (1, 2, 3) for kind in ("save", "report")]


def test_a_diverged_epoch_is_checkpointed_before_it_is_reported(data_dir, tmp_path, monkeypatch):
    events = []
    save, report = loop.Trainer.save_checkpoint, loop.Trainer._report_epoch
    monkeypatch.setattr(
        loop.Trainer, "save_checkpoint", lambda self, p: (events.append("save"), save(self, p))[1]
    )
    monkeypatch.setattr(
        loop.Trainer, "_report_epoch", lambda self: (events.append("report"), report(self))[1]
    )
    config = _config(secure=True, lr=1e6)
    env = Environment(data_dir=str(data_dir), download=False, progress=True)
    metrics = train_run(config, tmp_path / "run", env)
    assert metrics.outcome == "diverged"
    assert events and events[-1] == "report" and events[-2] == "save"
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert len(recorded["noise_key"]) == 8  # a resume keeps the key the run started with
