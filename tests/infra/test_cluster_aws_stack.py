"""The CloudFormation stack: cfn-lint clean offline, and the bucket the issue asks for."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def _cfn_lint() -> str | None:
    local = Path(sys.executable).parent / "cfn-lint"
    return str(local) if local.exists() else shutil.which("cfn-lint")


@pytest.mark.timeout(120)
def test_stacks_pass_cfn_lint(all_rendered):
    exe = _cfn_lint()
    if exe is None:
        pytest.skip("cfn-lint is not installed")
    files = [str(r.paths["aws_stack"]) for r in all_rendered.values()]
    proc = subprocess.run([exe, "--regions", "us-east-1", "--", *files], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(120)
def test_cfn_lint_catches_a_broken_stack(tmp_path, all_rendered):
    exe = _cfn_lint()
    if exe is None:
        pytest.skip("cfn-lint is not installed")
    stack = yaml.safe_load(next(iter(all_rendered.values())).paths["aws_stack"].read_text())
    stack["Resources"]["Bucket"]["Properties"]["VersioningConfiguration"] = {"Status": "On"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(stack))
    proc = subprocess.run([exe, "--", str(bad)], capture_output=True, text=True, timeout=110)
    assert proc.returncode != 0 and "'On' is not one of" in proc.stdout, proc.stdout


def test_bucket_is_private_encrypted_versioned_with_checkpoint_lifecycle(rendered):
    stack = yaml.safe_load(rendered.paths["aws_stack"].read_text())
    props = stack["Resources"]["Bucket"]["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert all(props["PublicAccessBlockConfiguration"].values())
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    rules = {r["Id"]: r for r in props["LifecycleConfiguration"]["Rules"]}
    old = rules["expire-old-checkpoint-versions"]
    assert old["Status"] == "Enabled" and "NoncurrentVersionExpiration" in old
    # The rule's prefix is where the rendered training job uploads its checkpoints.
    output = rendered.spec_json["output_uri"]
    bucket = rendered.spec_json["bucket"]
    assert output.startswith(f"s3://{bucket}/{old['Prefix']}")
    assert stack["Parameters"]["BucketName"]["Default"] == bucket
    statement = stack["Resources"]["BucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert statement["Effect"] == "Deny" and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
