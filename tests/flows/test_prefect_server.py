"""The README's "Run it on a Prefect server" section, run command by command against a real Prefect server.

The commands are read from the README itself (so the README cannot drift from what is tested), with the
ports replaced by free loopback ports, a fresh PREFECT_HOME (the server's own SQLite database), the MLflow
store moved to a temp file, and the run's parameters pointed at the test's S3 bucket with tiny training
overrides. Lines ending in ``&`` are started in the background (as the README's shell would) and stopped by their
process group id at the end, as the README's ``kill %1 %2 %3`` does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest
from flow_helpers import REPO, TINY_FINETUNE, TINY_PRETRAIN, free_port, kill_group

MARKER = "<!-- prefect-server-section -->"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    assert MARKER in text, "README.md lost its Prefect server section marker"
    section = text.split(MARKER, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_section_has_the_documented_steps():
    cmds = " \n".join(readme_commands())
    for step in ("prefect server start", "prefect work-pool create", "prefect --no-prompt deploy --all",
                 "prefect worker start", "prefect deployment run pretrain-coatnet/local", "mlflow ui"):
        assert step in cmds, step


def _get_json(url: str, body: dict | None = None) -> dict | list:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout}s")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_readme_commands_run_the_flow_on_a_real_server(tmp_path, flow_store, flow_tracking_uri):
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    run_params = {
        "store": flow_store,
        "work_dir": str(tmp_path / "runs"),
        "run_name": "server-run",
        "mlflow_tracking_uri": flow_tracking_uri,
        "pretrain_overrides": TINY_PRETRAIN,
        "finetune_overrides": TINY_FINETUNE,
    }

    def substitute(cmd: str) -> str:
        cmd = cmd.replace(":4200", f":{prefect_port}").replace("--port 4200", f"--port {prefect_port}")
        cmd = cmd.replace("--port 5000", f"--port {mlflow_port}")
        cmd = cmd.replace("sqlite:///mlflow.db", flow_tracking_uri)
        cmd = cmd.replace("demo-output", str(tmp_path / "demo-output"))
        if "deployment run pretrain-coatnet/local" in cmd:
            cmd += f" --params '{json.dumps(run_params)}' --watch-timeout 900"
        return cmd

    background: list[subprocess.Popen] = []
    outputs: dict[str, str] = {}
    try:
        for raw in readme_commands():
            cmd = substitute(raw)
            if cmd.startswith("export "):
                key, _, value = cmd[len("export "):].partition("=")
                env[key] = value
                continue
            if cmd.endswith("&"):
                log = open(tmp_path / f"bg-{len(background)}.log", "w")  # noqa: SIM115 - closed with the process
                background.append(subprocess.Popen(["bash", "-c", cmd[:-1].strip()], cwd=REPO, env=env,
                                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                continue
            done = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=1000)
            outputs[raw] = done.stdout + done.stderr
            assert done.returncode == 0, f"`{cmd}` exited {done.returncode}:\n{outputs[raw][-4000:]}"
            if "deploy --all" in cmd:
                api = env["PREFECT_API_URL"]
                names = {d["name"] + "@" + d["flow_id"] for d in _get_json(f"{api}/deployments/filter", {})}
                flows = {f["id"]: f["name"] for f in _get_json(f"{api}/flows/filter", {})}
                deployed = {f"{flows[n.split('@')[1]]}/{n.split('@')[0]}" for n in names}
                assert deployed >= {"pretrain-coatnet/local", "pretrain-coatnet/ray-cluster", "shard-dataset/local",
                                    "finetune-coatnet/local", "evaluate-coatnet/local"}, deployed
            if "deployment run" in cmd:
                assert "Completed" in outputs[raw], outputs[raw][-4000:]
        # The MLflow UI started by the README shows the registered model with its alias.
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        _wait_http(f"{mlflow_url}/health", 120, background[-1])
        model = _get_json(f"{mlflow_url}/api/2.0/mlflow/registered-models/get?name=coatnet-demo")["registered_model"]
        aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
        assert "candidate" in aliases, model
    finally:
        for proc in reversed(background):  # MLflow UI, worker, then the server
            kill_group(proc, signal.SIGTERM)
