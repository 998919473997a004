"""convflat.records: the one definition of train.json and measures.json (keys, format,
writer, reader), torch-free, and what train() writes through it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from convflat import records
from convflat.records import (
    MEASURES_FORMAT,
    MEASURES_KEYS,
    TRAIN_FORMAT,
    TRAIN_KEYS,
    RecordError,
    read_measures_record,
    read_train_record,
    write_measures_record,
    write_train_record,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_record(**over):
    rec = dict.fromkeys(TRAIN_KEYS)
    rec.update(format=TRAIN_FORMAT, status="ok", spec={"family": "gapcnn"}, config={},
               epochs_run=3, stop_reason="epochs", converged=True, history=[], resumes=0)
    rec.update(over)
    return rec


def test_the_module_imports_no_torch():
    code = ("import sys, convflat.records; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_train_record_round_trip(tmp_path):
    path = tmp_path / "train.json"
    rec = _train_record(train_loss=float("nan"), initial_loss=2.3, n_params=10)
    back = write_train_record(path, rec)
    assert back == json.loads(path.read_text())
    assert back["train_loss"] is None  # NaN is written as null
    assert back["initial_loss"] == 2.3 and back["n_params"] == 10
    assert read_train_record(path) == back


def test_train_writer_names_the_missing_key_and_refuses_bad_values(tmp_path):
    path = tmp_path / "train.json"
    rec = _train_record()
    del rec["initial_loss"]
    with pytest.raises(RecordError, match=r"train.json: .* lacks initial_loss"):
        write_train_record(path, rec)
    with pytest.raises(RecordError, match="stop_reason 'diverged' is not one of"):
        write_train_record(path, _train_record(stop_reason="diverged"))
    with pytest.raises(RecordError, match="status 'fine' is not one of"):
        write_train_record(path, _train_record(status="fine"))
    with pytest.raises(RecordError, match="format is 'x', expected 'convflat-train/1'"):
        write_train_record(path, _train_record(format="x"))
    assert not path.exists()  # nothing written by a refused record


def test_a_failed_record_before_training_needs_only_the_required_keys(tmp_path):
    rec = {"format": TRAIN_FORMAT, "status": "failed", "spec": {}, "config": {},
           "epochs_run": 0, "converged": False, "error": "ValueError: x",
           **dict.fromkeys(("train_loss", "test_loss", "train_acc", "test_acc", "loss_gap",
                            "acc_gap", "test_error"))}
    back = write_train_record(tmp_path / "train.json", rec)
    assert back["initial_loss"] is None and back["n_params"] is None  # filled by the reader


def test_reader_fills_the_keys_of_later_revisions_and_names_a_bad_file(tmp_path):
    old = _train_record()
    del old["initial_loss"], old["n_params"]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(old))
    back = read_train_record(path)
    assert back["initial_loss"] is None and back["n_params"] is None
    path.write_text("{not json")
    with pytest.raises(RecordError, match=r"train.json is not readable JSON"):
        read_train_record(path)
    path.write_text("[1, 2]")
    with pytest.raises(RecordError, match="must be a JSON object"):
        read_train_record(path)
    with pytest.raises(FileNotFoundError):
        read_train_record(tmp_path / "none.json")
    path.write_text(json.dumps({**old, "format": MEASURES_FORMAT}))
    with pytest.raises(RecordError, match="expected 'convflat-train/1'"):
        read_train_record(path)


def test_measures_record_round_trip_and_errors(tmp_path):
    path = tmp_path / "measures.json"
    rec = {**dict.fromkeys(MEASURES_KEYS), "format": MEASURES_FORMAT, "status": "ok",
           "values": {"a": 1.0}, "failed": [], "skipped": [], "measures": {}, "run_id": "r"}
    assert write_measures_record(path, rec) == json.loads(path.read_text())
    assert read_measures_record(path)["run_id"] == "r"
    del rec["values"]
    with pytest.raises(RecordError, match="lacks values"):
        write_measures_record(path, rec)


def test_train_json_written_by_train_has_exactly_the_documented_keys(tmp_path, digits):
    """train() writes every key of TRAIN_KEYS and no other; the measures module writes
    what MEASURES_KEYS lists, so the readers here accept its files."""
    import torch

    from convflat.measures import compute_measures, write_measures_json
    from convflat.models import load_checkpoint
    from convflat.train import TrainConfig, train

    record = train({"family": "gapcnn", "width": 4, "depth": 2}, digits,
                   TrainConfig(epochs=1, batch_size=64, device="cpu"), tmp_path)
    assert set(record) == set(TRAIN_KEYS)
    assert read_train_record(tmp_path / "train.json") == record
    model, _ = load_checkpoint(tmp_path / "model.pt")
    x, y = digits.tensors("train")
    results = compute_measures(model, (x[:50], y[:50]), names=["frobenius_norm"],
                               device="cpu")
    write_measures_json(tmp_path / "measures.json", results, device=torch.device("cpu"))
    assert set(MEASURES_KEYS) <= set(read_measures_record(tmp_path / "measures.json"))


def test_format_names_are_those_of_the_measures_module():
    from convflat.measures import MEASURES_FORMAT as registry_format

    assert records.MEASURES_FORMAT == registry_format
