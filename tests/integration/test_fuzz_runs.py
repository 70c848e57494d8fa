"""Random command lines drawn from the config's schema (tests/fuzzing.py) through `python -m bench`, as a user runs
them: a config error is never a failed row. In-process, for many more: tests/unit/test_fuzz.py."""

import subprocess
import sys

from hypothesis import HealthCheck, given, settings

from conftest import REPO, read_rows
from fuzzing import command_lines


@settings(max_examples=1, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(command_lines())
def test_through_python_dash_m_bench_a_config_error_is_never_a_failed_row(tmp_path_factory, args):
    results = tmp_path_factory.mktemp("fuzz")
    proc = subprocess.run([sys.executable, "-m", "bench", f"results_dir={results}", "progress=false", *args,
                           "timeout_s=120"], capture_output=True, text=True, cwd=REPO, timeout=300)
    rows = read_rows(results / "runs.jsonl") if (results / "runs.jsonl").exists() else []
    if proc.returncode == 2:
        assert len(proc.stderr.strip().splitlines()) == 1 and not rows, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert rows and all(r["status"] == "ok" for r in rows)
