"""No credentials in any rendered file: access comes from instance profiles, IRSA and Secret references."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
    "AWS secret key setting": re.compile(r"secret_access_key|aws_secret|AWS_SECRET", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password literal": re.compile(r"password\s*[:=]\s*['\"]?(?!\$\()[^\s'\"$]+", re.I),
    "credentials in a URI": re.compile(r"://[^/\s:@]+:(?!\$\()[^@\s/]+@"),
    "token or api key literal": re.compile(r"(api[_-]?key|token)\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{16,}", re.I),
}


def findings(text: str) -> list[str]:
    return [name for name, pat in PATTERNS.items() if pat.search(text)]


def test_scanner_finds_planted_credentials():
    assert "AWS access key id" in findings("key: AKIAIOSFODNN7EXAMPLE")
    assert "AWS secret key setting" in findings("aws_secret_access_key = abc")
    assert "password literal" in findings("POSTGRES_PASSWORD=hunter2")
    assert "credentials in a URI" in findings("postgresql://mlflow:hunter2@db:5432/mlflow")
    assert findings("postgresql://mlflow:$(MLFLOW_DB_PASSWORD)@mlflow-postgres:5432/mlflow") == []


def test_no_credentials_in_rendered_files(rendered):
    out = Path(rendered.paths["spec"]).parent
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == len(rendered.paths)
    for path in files:
        assert findings(path.read_text()) == [], path


def test_secret_values_only_by_reference(rendered):
    for key in ("raycluster", "rayjob", "services"):
        for doc in rendered.yaml_docs(key):
            for env in _envs(doc):
                if re.search(r"PASSWORD|URI$|KEY$|TOKEN", env["name"]) and "MLFLOW_TRACKING_URI" != env["name"]:
                    assert "secretKeyRef" in env.get("valueFrom", {}), env


def _envs(node):
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from node["env"]
        for v in node.values():
            yield from _envs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _envs(v)


def test_rendered_yaml_files_parse(rendered):
    for key, path in rendered.paths.items():
        if path.suffix == ".yaml":
            assert list(yaml.safe_load_all(path.read_text())), key
