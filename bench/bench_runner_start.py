"""Time from a start request to the trainer process running, through a real runner process and real NATS.

Measured: publish of the StartJob command -> the trainer's first line of Python (it writes time.time() before any
import of its own), so Python's own start-up is included but not the trainer's imports. Median of N (default 10).

    .venv/bin/python bench/bench_runner_start.py [N]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nats  # noqa: E402

from kiln_contracts import streams  # noqa: E402
from kiln_testing import NatsServer  # noqa: E402
from kiln_testing.runners import EventLog, RunnerProc, publish_start, spec  # noqa: E402

TRAINER = "import time, os; t = time.time(); open(os.environ['BENCH_OUT'], 'a').write(f\"{os.environ['KILN_JOB_ID']} {t}\\n\")"


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        server = NatsServer(tmp / "nats")
        server.start()
        out = tmp / "starts.txt"
        (tmp / "ds").mkdir()
        (tmp / "ds" / "data.yaml").write_text("names: {0: a}\n")
        import os

        os.environ["BENCH_OUT"] = str(out)
        runner = RunnerProc(server.url, tmp / "runners", "bench", tmp / "fake.log",
                            trainer_cmd=[sys.executable, "-S", "-c", TRAINER]).wait_ready()
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await streams.ensure_streams(js)
        log = await EventLog().start(js)
        published: dict[str, float] = {}
        spawn_ms = []
        try:
            for i in range(n + 1):  # the first run warms caches and is not counted
                job = f"bench{i}"
                published[job] = time.time()
                await publish_start(js, job, spec(str(tmp / "ds"), seconds=0.5))
                await log.wait(lambda: log.finished(job), timeout=30)
                det = next(e.data.details for e in log.of(job, "status") if e.data.status.value == "running")
                if i:
                    spawn_ms.append(det["spawn_ms"])
        finally:
            await nc.close()
            runner.stop()
            server.stop()
        started = dict(line.split() for line in out.read_text().splitlines())
        lat = [(float(started[j]) - published[j]) * 1000 for j in published if j != "bench0"]
        print(f"start request -> trainer process running, n={len(lat)}: median {statistics.median(lat):.1f} ms, "
              f"min {min(lat):.1f} ms, max {max(lat):.1f} ms")
        print(f"  of which fork+exec in the runner (spawn_ms): median {statistics.median(spawn_ms):.1f} ms")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
