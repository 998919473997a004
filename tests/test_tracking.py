"""convflat.tracking: the cheap measures tracked after every epoch (TrainConfig.track_measures,
track_every, track_costly) next to the conv flatness."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from convflat.errors import OptionError
from convflat.measures import MEASURES
from convflat.models import load_checkpoint
from convflat.train import TrainConfig, train
from convflat.train_config import TRACK_CHEAP, TRACK_DENSE_EPOCHS

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"family": "gapcnn", "width": 8, "depth": 3}
FAST = TrainConfig(epochs=3, batch_size=64, lr=0.1, device="cpu", track_flatness=300,
                   eval_batch_size=128)


def _subset(prepared, n):
    """The tracked subset rebuilt by hand: the first n of randperm(N) under seed 0,
    normalized in float32."""
    idx = torch.randperm(prepared.x_train.shape[0],
                         generator=torch.Generator().manual_seed(0))[:n]
    x = prepared.x_train[idx].float() / 255
    x = (x - prepared.mean.view(1, -1, 1, 1)) / prepared.std.view(1, -1, 1, 1)
    return x, prepared.y_train[idx]


def test_cheap_set_is_registered_and_the_default():
    assert set(TRACK_CHEAP) <= set(MEASURES)
    assert TrainConfig().tracked_measures == TRACK_CHEAP
    assert TrainConfig(track_flatness=0).tracked_measures == ()
    assert TrainConfig(track_measures=None).tracked_measures == ()
    cfg = TrainConfig(track_measures="path_norm, cheap")
    assert cfg.tracked_measures[0] == "path_norm" and len(cfg.tracked_measures) == 9
    listed = TrainConfig.from_dict({"track_measures": ["frobenius_norm", "inverse_margin"]})
    assert listed.track_measures == ("frobenius_norm", "inverse_margin")
    assert listed.to_dict()["track_measures"] == ["frobenius_norm", "inverse_margin"]


@pytest.mark.parametrize("kwargs, key, words", [
    ({"track_measures": "hutchinson_trace"}, "track_measures", "track_costly"),
    ({"track_measures": ["frobenius_norm", "sharpness_worst"]}, "track_measures",
     "'sharpness_worst'"),
    ({"track_measures": 3}, "track_measures", "comma-separated"),
    ({"track_costly": 1}, "track_costly", "true or"),
    ({"track_every": 0}, "track_every", "positive"),
])
def test_bad_values_name_the_key(kwargs, key, words):
    with pytest.raises(OptionError, match=words) as err:
        TrainConfig(**kwargs)
    assert err.value.key == key


def test_unregistered_or_twice_tracked_names_are_refused(tmp_path, digits):
    """Costly names pass TrainConfig with track_costly; the tracker then refuses a name
    that is not registered, and the conv keys tracked anyway, before training."""
    for names, words in (("no_such_measure", "unknown measure"),
                         ("conv_trace", "tracked by track_flatness")):
        cfg = dataclasses.replace(FAST, track_measures=names, track_costly=True)
        with pytest.raises(OptionError, match=words) as err:
            train(SMALL, digits, cfg, tmp_path / names)
        assert err.value.key == "track_measures"


def test_last_epoch_values_equal_the_registry_on_the_final_model(tmp_path, digits):
    """History keys, and each tracked value at the last epoch against MEASURES[name] called
    on its own on model.pt, init.pt and the subset rebuilt by hand (another batch size)."""
    record = train(SMALL, digits, dataclasses.replace(FAST, stop_loss=1e-9), tmp_path)
    keys = ["conv_trace", "conv_relative_flatness", *TRACK_CHEAP]
    assert record["flatness_tracking"] == {"n_samples": 300, "subset_seed": 0, "keys": keys,
                                           "error": None, "measure_errors": {}}
    # every key at every epoch (an early inverse margin may be infinite: written "inf")
    assert all(entry[k] is not None for entry in record["history"] for k in keys)
    last = record["history"][-1]
    assert all(isinstance(last[k], float) and math.isfinite(last[k]) for k in keys)
    # the weights move: every norm differs from epoch to epoch
    assert len({e["frobenius_norm"] for e in record["history"]}) == 3
    assert record["history"][0]["distance_from_init"] > 0
    model, _ = load_checkpoint(tmp_path / "model.pt")
    init, _ = load_checkpoint(tmp_path / "init.pt")
    x, y = _subset(digits, 300)
    for name in TRACK_CHEAP:
        ref = MEASURES[name](model, (x, y), init_model=init, device="cpu", batch_size=100)
        assert ref["status"] == "ok", name
        assert last[name] == pytest.approx(ref["value"], rel=1e-6, abs=1e-12), name


def test_measures_thinned_after_the_dense_epochs(tmp_path, digits):
    """After the first TRACK_DENSE_EPOCHS epochs the measures come every track_every-th
    epoch and at the last; the conv keys every epoch."""
    cfg = dataclasses.replace(FAST, epochs=TRACK_DENSE_EPOCHS + 7, track_every=4,
                              track_measures="frobenius_norm", track_flatness=64,
                              batch_size=512, lr=0.01)
    record = train({**SMALL, "width": 4}, digits, cfg, tmp_path)
    epochs = [e["epoch"] for e in record["history"] if e["frobenius_norm"] is not None]
    assert epochs == [*range(1, TRACK_DENSE_EPOCHS + 1), 52, 56, 57]
    assert all(e["conv_trace"] is not None for e in record["history"])


def test_a_failing_measure_is_none_and_said_once(tmp_path, digits, monkeypatch):
    """A tracked measure that raises is None at every epoch, its error recorded once; the
    others and training go on."""
    calls = []

    def broken(ctx, **params):
        calls.append(1)
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(MEASURES["path_norm"], "func", broken)
    cfg = dataclasses.replace(FAST, track_measures="path_norm,frobenius_norm")
    record = train(SMALL, digits, cfg, tmp_path)
    assert record["status"] == "ok" and len(calls) == 3
    assert [e["path_norm"] for e in record["history"]] == [None] * 3
    assert all(e["frobenius_norm"] > 0 for e in record["history"])
    assert record["flatness_tracking"]["measure_errors"] == {
        "path_norm": "RuntimeError: broken on purpose"}
