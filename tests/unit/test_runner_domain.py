"""Pure rules of the runner: the failure reason taken from a trainer's traceback, and what an invalid start command
still says about its job."""

import doctest

import pytest
from pydantic import ValidationError

from kiln_contracts import ExitClass, JobStatus, StartJob
from kiln_runner import domain
from kiln_runner.domain import JobRef, classify_exit, invalid_reason, job_of_invalid_start, trainer_exception

SEED = [
    "kiln: versions kiln=0.1 ultralytics=8.3",
    "Traceback (most recent call last):",
    '  File "/x/trainer.py", line 12, in <module>',
    "    init_seeds(-1)",
    '  File "/x/utils.py", line 3, in init_seeds',
    "    np.random.seed(seed)",
    "ValueError: Seed must be between 0 and 2**32 - 1",
]


def test_the_docstring_examples_hold():
    assert doctest.testmod(domain).failed == 0


@pytest.mark.parametrize(("tail", "expected"), [
    (SEED, "ValueError: Seed must be between 0 and 2**32 - 1"),
    # chained: the last traceback is the one that ended the process
    (["Traceback (most recent call last):", '  File "a.py", line 1, in f', "KeyError: 'x'", "",
      "During handling of the above exception, another exception occurred:", "",
      "Traceback (most recent call last):", '  File "a.py", line 3, in g', "RuntimeError: no x"], "RuntimeError: no x"),
    # a long traceback whose header left the runner's 30-line tail: the frames still show where it ends
    (['  File "torch/nn/modules/module.py", line 1553, in _call_impl', "    return forward_call(*args)",
      "torch.AcceleratorError: CUDA error: device-side assert"],
     "torch.AcceleratorError: CUDA error: device-side assert"),
    # a bare exception name (an assert without a message), then lines printed after it
    (["Traceback (most recent call last):", '  File "a.py", line 1, in <module>', "    assert ok", "AssertionError",
      "epoch: 3"], "AssertionError"),
    # a multi-line message: its first line
    (["Traceback (most recent call last):", '  File "a.py", line 1, in <module>', "ValueError: first", "second"],
     "ValueError: first"),
    # Python 3.11 position markers and a SyntaxError
    (["Traceback (most recent call last):", '  File "a.py", line 1', "    x = (", "        ^",
      "SyntaxError: '(' was never closed"], "SyntaxError: '(' was never closed"),
    (["ValueError: bad"], None),  # no traceback: an ordinary log line, not an exception report
    (["Traceback (most recent call last):", '  File "a.py", line 1, in <module>'], None),  # cut short
    ([], None),
])
def test_trainer_exception(tail, expected):
    assert trainer_exception(tail) == expected


def test_a_trainer_exception_is_the_failure_reason():
    out = classify_exit(1, SEED)
    assert (out.status, out.exit_class) == (JobStatus.failed, ExitClass.user_error)
    assert out.reason == "trainer failed: ValueError: Seed must be between 0 and 2**32 - 1 (exit code 1)"


def test_a_kiln_line_after_the_traceback_still_wins_and_one_before_it_does_not():
    assert classify_exit(2, ["Traceback", "kiln: dataset not found: /x"]).reason == "dataset not found: /x"
    assert classify_exit(2, [*SEED, "kiln: seed must be >= 0"]).reason == "seed must be >= 0"
    assert classify_exit(1, [*SEED, "kiln: bad seed"]).reason == "trainer exited with code 1: bad seed"
    # "kiln: versions ..." is a note printed before training: the exception that followed it is the cause
    assert classify_exit(2, SEED).reason == ("trainer failed: ValueError: Seed must be between 0 and 2**32 - 1 "
                                             "(exit code 2)")


def test_other_outcomes_are_unchanged_by_a_traceback():
    assert classify_exit(1, ["ValueError: bad"]).reason == "trainer exited with code 1: ValueError: bad"
    oom = classify_exit(1, ["Traceback (most recent call last):", '  File "t.py", line 9, in step',
                            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"])
    assert oom.exit_class == ExitClass.out_of_memory
    assert oom.reason == ("out of memory (exit code 1): torch.OutOfMemoryError: CUDA out of memory. "
                          "Tried to allocate 2.00 GiB")
    assert classify_exit(-9, SEED).exit_class == ExitClass.killed
    assert classify_exit(3, SEED).status == JobStatus.cancelled
    assert classify_exit(0, SEED).status == JobStatus.completed


def test_a_very_long_exception_message_is_shortened():
    reason = classify_exit(1, ["Traceback (most recent call last):", "  File", "ValueError: " + "x" * 5000]).reason
    assert len(reason) < 700 and reason.endswith("… (exit code 1)")


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"job_id": "j-1", "attempt": 2, "spec": {"project": "p1", "train": {"scale": NaN}}}', JobRef("j-1", 2, "p1")),
    (b'{"job_id": "j", "spec": {"train": {"scale": 1e400}}}', JobRef("j", 1, "default")),  # attempt's default
    (b'{"v": 1, "job_id": "j", "spec": {"project": "no spaces!"}}', JobRef("j", 1, "default")),
    (b'{"job_id": "j", "spec": []}', JobRef("j", 1, "default")),
    (b'{"job_id": "bad id", "spec": {}}', None),
    (b'{"job_id": 7, "spec": {}}', None),
    (b'{"spec": {}}', None),
    (b'{"job_id": "j", "attempt": 0}', None),
    (b'{"job_id": "j", "attempt": "2"}', None),  # which attempt it means is a guess: end nothing
    (b'{"job_id": "j", "attempt": true}', None),
    (b'{"v": 7, "job_id": "j"}', None),  # another version's command: not this runner's to judge
    (b"{broken", None),
    (b"[1, 2]", None),
    (b"\xff\xfe", None),
])
def test_job_of_invalid_start(raw, expected):
    assert job_of_invalid_start(raw) == expected


def test_invalid_reason_names_the_field_and_the_rule():
    with pytest.raises(ValidationError) as exc:
        StartJob.model_validate_json(b'{"job_id": "j", "spec": {"model": "m.yaml", "dataset": "/d", '
                                     b'"train": {"scale": 1e400}}}')
    assert invalid_reason(exc.value) == "invalid start command: spec.train.scale: Input should be a finite number"
    with pytest.raises(ValidationError) as exc:
        StartJob.model_validate_json(b"{broken")
    assert invalid_reason(exc.value).startswith("invalid start command: Invalid JSON")
    with pytest.raises(ValidationError) as exc:
        StartJob.model_validate_json(b'{"job_id": "j", "spec": {"epochs": 1, "model": 1, "x": 2, "y": 3}}')
    assert invalid_reason(exc.value).endswith("(and 3 more)")
    assert len(invalid_reason(ValueError("v" * 2000))) < 400


@pytest.mark.parametrize("line", [
    "RuntimeError: NCCL error in: ../nccl.cpp:1, unhandled system error",
    "torch.AcceleratorError: CUDA error: an illegal memory access was encountered",
    "OSError: [Errno 5] Input/output error: '/data/images/0001.jpg'",
    "OSError: [Errno 28] No space left on device",
])
def test_a_host_failure_is_infrastructure_and_so_retried_by_default(line):
    from kiln_contracts import JobSpec
    from kiln_runner.domain import classify_exit, retry_after

    outcome = classify_exit(1, ["Traceback (most recent call last):", '  File "t.py", line 1, in <module>', line])
    assert outcome.exit_class == ExitClass.infrastructure and outcome.reason.startswith("host failure: ")
    assert retry_after(JobSpec(model="m.yaml", dataset="/d", max_attempts=2), 1, outcome) == 30.0
