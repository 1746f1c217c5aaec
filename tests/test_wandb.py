"""train.py with logger=wandb, offline: the resolved config goes to the run as plain values, the run is
closed (marked failed when training raised), and nothing but metrics and the config is uploaded."""

import json
import struct
from pathlib import Path

import pytest
import wandb
from lightning.pytorch.callbacks import Callback
from wandb.proto import wandb_internal_pb2

from run.cli import compose_config
from run.train import train


def finished_run_records(run_dir: Path) -> list:
    """The records of the one offline W&B run under ``run_dir``, once the run is finished (``wandb.run``
    is None: ``finish()`` was called). ``finish()`` hands the rest of the run to W&B's service process,
    which writes the file on its own time; ``wandb.teardown()`` waits for it to stop."""
    assert wandb.run is None, "the run was not finished"
    wandb.teardown()
    return run_records(run_dir)


def run_records(run_dir: Path) -> list:
    """The records of the one offline W&B run under ``run_dir``, read from its ``.wandb`` file: W&B's
    LevelDB-style log (a 7-byte file header, then 32 KiB blocks of records, each a 7-byte header --
    crc32, length, type: 1 full, 2 first, 3 middle, 4 last -- and a chunk of a protobuf Record)."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline run, found {files}"
    data, position, chunks, records = files[0].read_bytes(), 7, [], []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # too short for a header: padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunks.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def logged_config(records: list) -> dict:
    """The run's config: the run record's (updates made while the run starts can land there) and every
    later config record's, in order."""
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config |= {item.key: json.loads(item.value_json) for item in updates}
    return config


def exit_codes(records: list) -> list[int]:
    return [record.exit.exit_code for record in records if record.WhichOneof("record_type") == "exit"]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_run(demo_overrides, *extra):
    return compose_config("train", [*demo_overrides, "logger=wandb", "trainer.max_steps=2",
                                    "trainer.log_every_n_steps=1", "data.limit.train=16", *extra])


def test_the_run_gets_the_resolved_config_as_plain_values_and_nothing_else_and_is_finished(demo_overrides, tiny_base,
                                                                                          tmp_path, offline):
    train(wandb_run(demo_overrides))
    records = finished_run_records(tmp_path / "run")
    config = logged_config(records)
    assert config["model"]["net"]["base"] == str(tiny_base)  # ${paths.tiny_base}, resolved
    assert config["paths"]["output_dir"] == str(tmp_path / "run")
    assert config["model"]["optimizer"]["lr"] == 1.0e-3 and config["trainer"]["max_steps"] == 2
    assert config["logger"]["wandb"]["log_model"] is False
    assert "${" not in json.dumps(config)
    # Only the config: the module's and datamodule's own hyper-parameters are not logged beside it.
    assert not {"net", "optimizer", "tasks", "batch_size"} & set(config)
    assert any(record.WhichOneof("record_type") == "history" for record in records)  # metrics were logged
    assert exit_codes(records) == [0]
    # Nothing uploaded but the config and metrics: no checkpoint artifact, no image.
    kinds = {record.WhichOneof("record_type") for record in records}
    assert "artifact" not in kinds and "use_artifact" not in kinds
    uploaded = [file.path for record in records if record.WhichOneof("record_type") == "files"
                for file in record.files.files]
    assert not [path for path in uploaded if path.endswith((".png", ".jpg", ".jpeg", ".ckpt", ".pt", ".distcp"))]
    assert not list((tmp_path / "run" / "wandb").rglob("media"))


class FailWhenTrainingStarts(Callback):
    """Raises once the W&B run has begun: training that fails (a missing checkpoint or input is refused
    before any run starts)."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("training failed")


def test_a_run_that_raises_is_finished_as_failed(demo_overrides, tmp_path, offline):
    with pytest.raises(RuntimeError, match="training failed"):
        train(wandb_run(demo_overrides, f"+callbacks.fail._target_={__name__}.FailWhenTrainingStarts"))
    assert exit_codes(finished_run_records(tmp_path / "run")) == [1]

