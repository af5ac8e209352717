"""``verify_shards``: re-read the manifest and every object it lists; check hashes and counts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.data.manifest import MANIFEST, load_manifest, manifest_hash


@dataclass
class VerifyReport:
    root: str
    objects: int = 0
    bytes: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = "OK" if self.ok else f"FAILED ({len(self.errors)} problem(s))"
        lines = [f"verify {self.root}: {head}",
                 f"  {self.objects} objects, {self.bytes} bytes, samples {self.samples}"]
        lines += [f"  - {e}" for e in self.errors[:50]]
        if len(self.errors) > 50:
            lines.append(f"  ... and {len(self.errors) - 50} more")
        return "\n".join(lines)


def _sha256_uri(uri: str) -> tuple[int, str]:
    data = storage.read_bytes(uri)
    return len(data), hashlib.sha256(data).hexdigest()


def verify_shards(uri: str) -> VerifyReport:
    """Check the dataset at ``uri`` against its manifest; ``report.ok`` is False on any mismatch."""
    manifest = load_manifest(uri)
    root = manifest["root"]
    report = VerifyReport(root)
    stored = json.loads(storage.read_text(storage.join(root, MANIFEST)))
    if stored.get("manifest_hash") != manifest_hash(stored):
        report.errors.append("manifest.json: manifest_hash does not match its content (edited or corrupted)")
    for obj in manifest["shards"]:
        obj_uri = storage.join(root, obj["path"])
        try:
            size, digest = _sha256_uri(obj_uri)
        except Exception as e:  # noqa: BLE001 - a missing/unreadable object is a finding, not a crash
            report.errors.append(f"{obj['path']}: cannot read ({type(e).__name__}: {e})")
            continue
        report.objects += 1
        report.bytes += size
        if size != obj["size"]:
            report.errors.append(f"{obj['path']}: size {size} != manifest {obj['size']}")
        if digest != obj["sha256"]:
            report.errors.append(f"{obj['path']}: sha256 {digest[:16]} != manifest {obj['sha256'][:16]}")
    for split, info in manifest["splits"].items():
        try:
            index = json.loads(storage.read_text(storage.join(root, split, "index.json")))
        except Exception as e:  # noqa: BLE001
            report.errors.append(f"{split}/index.json: cannot read ({type(e).__name__}: {e})")
            continue
        samples = sum(s["samples"] for s in index["shards"])
        report.samples[split] = samples
        if samples != info["samples"]:
            report.errors.append(f"{split}: index has {samples} samples, manifest {info['samples']}")
        masked = info.get("masked", [])
        if masked and (masked != sorted(set(masked)) or masked[0] < 0 or masked[-1] >= info["samples"]):
            report.errors.append(f"{split}: masked sample indices are not sorted, unique and within 0..{info['samples'] - 1}")
        if sum(info["class_counts"]) != info["samples"]:
            report.errors.append(f"{split}: per-class counts sum to {sum(info['class_counts'])}, not {info['samples']}")
        listed = {f"{split}/{s['raw_data']['basename']}" for s in index["shards"]}
        if listed != set(info["shards"]):
            report.errors.append(f"{split}: index shards differ from the manifest's: "
                                 f"{sorted(listed ^ set(info['shards']))[:5]}")
    inputs = manifest.get("inputs", {})
    if "duplicates" in inputs:
        physical = sum(info["samples"] for info in manifest["splits"].values())
        masked = sum(len(info.get("masked", [])) for info in manifest["splits"].values())
        if inputs["written"] + inputs["quarantined"] + inputs["duplicates"] != inputs["listed"]:
            report.errors.append(f"inputs: {inputs['written']} written + {inputs['quarantined']} quarantined + "
                                 f"{inputs['duplicates']} duplicates != {inputs['listed']} listed")
        if physical - masked != inputs["written"] or masked != inputs.get("masked", 0):
            report.errors.append(f"inputs: {physical} samples in the splits less {masked} masked != "
                                 f"{inputs['written']} written")
    return report
