"""`kiln train`'s key=value arguments and job files onto the contracts' JobSpec (no server)."""

from __future__ import annotations

import pytest
from kiln_client.cli.args import ArgError, job_spec, merge, normalise, parse_pairs
from kiln_contracts import ExitClass, JobSpec, Optimizer


def spec(*pairs: str, base: dict | None = None) -> JobSpec:
    return job_spec(merge(base or {}, parse_pairs(list(pairs))))


def test_yolo_style_pairs_become_a_typed_job_spec():
    s = spec("model=yolov8n.yaml", "data=s3://bucket/shapes", "epochs=50", "imgsz=640", "project=vision",
             "pool=gpu", "name=my run", "lr0=1", "amp=False", "cache=ram", "optimizer=AdamW", "device=0,1",
             "retry_on=infrastructure,out_of_memory", "timeout=3600", "max_attempts=3")
    assert (s.model, s.dataset, s.project, s.pool, s.name) == ("yolov8n.yaml", "s3://bucket/shapes", "vision", "gpu",
                                                                "my run")
    t = s.train
    assert (t.epochs, t.imgsz, t.lr0, t.amp, t.cache, t.optimizer, t.device) == (50, 640, 1.0, False, "ram",
                                                                                Optimizer.AdamW, "0,1")
    assert s.retry_on == [ExitClass.infrastructure, ExitClass.out_of_memory] and s.timeout_s == 3600
    assert spec("model=m.yaml", "data=/d", "device=none").train.device is None


@pytest.mark.parametrize(("pairs", "message"), [
    (["epoch=3"], "unknown argument 'epoch' (did you mean epochs?)"),
    (["lr=0.1"], "unknown argument 'lr'"),
    (["epochs"], "expected key=value, got 'epochs'"),
    (["epochs=3", "epochs=4"], "epochs is given twice"),
    (["data=/a", "dataset=/b"], "dataset is given twice"),
    (["epochs=ten"], "epochs=ten: Input should be a valid integer"),
    (["amp=maybe"], "amp=maybe: Input should be a valid boolean"),
    (["retry_on=cancelled"], "cancelled cannot be retried"),
    (["imgsz=65"], "imgsz: Value error, imgsz must be a multiple of 32"),
    (["epochs=0"], "epochs: Input should be greater than or equal to 1"),
    (["model=https://x/y.pt"], "model: Value error, model must be a model YAML name or a path on the runner"),
])
def test_a_bad_argument_says_which_and_why(pairs, message):
    with pytest.raises(ArgError) as err:
        spec(*pairs, base={"model": "yolov8n.yaml", "dataset": "/d"})
    assert message in str(err.value)


def test_missing_fields_are_named_as_the_command_spells_them():
    with pytest.raises(ArgError, match=r"model: Field required; data \(the dataset\): Field required"):
        spec("epochs=3")


def test_a_job_file_flat_or_nested_and_pairs_override_it():
    flat = normalise({"model": "yolov8n.yaml", "data": "/d", "epochs": 3, "imgsz": 64, "project": "vision"})
    nested = normalise({"model": "yolov8n.yaml", "dataset": "/d", "project": "vision",
                        "train": {"epochs": 3, "imgsz": 64}})
    assert job_spec(flat) == job_spec(nested)
    s = job_spec(merge(flat, parse_pairs(["epochs=300", "name=long"])))
    assert (s.train.epochs, s.train.imgsz, s.name) == (300, 64, "long")
    with pytest.raises(ArgError, match="unknown argument 'epoch'"):
        normalise({"model": "m.yaml", "epoch": 3})
    with pytest.raises(ArgError, match="must hold a mapping"):
        normalise(["model=m.yaml"])  # type: ignore[arg-type]
