"""Helpers of tests/gpu/gpu_check.sh: everything the script records goes to ONE JSON-lines file.

    python tests/gpu/collect.py env RESULTS                 # device, versions, GPU name
    python tests/gpu/collect.py step RESULTS NAME RC SECONDS [FILE.json | FILE.xml ...]
    python tests/gpu/collect.py summary RESULTS             # the short table printed last

``step`` appends one line for the step (status from the exit code: ok, FAIL, TIMEOUT), one line
per JSON file the step left (bench_step's partial or final result, so a step that timed out still
reports the rows it finished) and one line per test of a pytest JUnit XML report. No file but RESULTS is written under $OUT.
"""

import json
import os
import platform
import sys
import time


def append(path: str, record: dict) -> None:
    """One JSON line, flushed to disk at once (the device may stop the script at any moment)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def status(rc: int) -> str:
    if rc == 0:
        return "ok"
    return "TIMEOUT" if rc in (124, 137) else "FAIL"


def env_record() -> dict:
    rec = {"step": "env", "kind": "env", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rec["python"] = sys.version.split()[0]
    rec["machine"] = platform.machine()
    for name in (
        "torch",
        "triton",
        "transformers",
        "peft",
        "deepspeed",
        "bitsandbytes",
        "webdataset",
        "nibabel",
    ):
        try:
            mod = __import__(name)
            rec[name] = getattr(mod, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - a missing package is a finding, not a failure
            rec[name] = f"missing ({type(exc).__name__})"
    import torch

    rec["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec["device"] = torch.cuda.get_device_name(0)
        rec["sms"] = props.multi_processor_count
        rec["memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        rec["device"] = "cpu (dry run: Triton interpreter, tiny shapes)"
    return rec


def junit_cases(path: str) -> list[dict]:
    """One record per test of a pytest --junitxml report: name, outcome, the failure's message."""
    import xml.etree.ElementTree as ET

    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        rec = {"kind": "test", "name": case.get("name"), "seconds": float(case.get("time", 0))}
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                rec["outcome"] = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                rec["message"] = (found.get("message") or "")[:500]
                break
        else:
            rec["outcome"] = "passed"
        cases.append(rec)
    return cases


def step_records(name: str, rc: int, seconds: float, files: list[str]) -> list[dict]:
    out = [{"step": name, "kind": "status", "status": status(rc), "rc": rc, "seconds": seconds}]
    for path in files:
        if os.path.exists(path) and path.endswith(".xml"):
            out.extend({"step": name, **case} for case in junit_cases(path))
        elif os.path.exists(path):
            try:
                out.append(
                    {
                        "step": name,
                        "kind": "result",
                        "file": os.path.basename(path),
                        "result": json.load(open(path)),
                    }
                )
            except json.JSONDecodeError as exc:
                out.append(
                    {"step": name, "kind": "result", "file": os.path.basename(path), "error": str(exc)}
                )
    return out


def summary(path: str) -> str:
    lines = []
    for line in open(path):
        rec = json.loads(line)
        if rec.get("kind") == "status":
            lines.append(f"{rec['status']:<8} {rec['step']:<16} rc={rec['rc']} {rec['seconds']} s")
        elif rec.get("kind") == "test" and rec["outcome"] != "skipped":
            lines.append(f"  {rec['outcome']:<7} {rec['name']}")
        elif rec.get("kind") == "row" and "error" not in rec:
            fwd = rec["fwd_ms"][1] * 1e3
            graph = f"{rec['fwd_graph_ms'][1] * 1e3:.1f}" if rec.get("fwd_graph_ms") else "-"
            lines.append(
                f"  {rec['shape']:<30} {rec['impl']:<18} fwd {fwd:9.1f} us graph {graph:>8} "
                f"fwd+bwd {rec['fwd_bwd_ms'][1] * 1e3:9.1f} us err O {rec['err_O']:.1e} dQKV {rec['err_grads']:.1e}"
            )
        elif rec.get("kind") == "row":
            lines.append(f"  {rec['shape']:<30} {rec['impl']:<18} FAILED {rec['error'][:60]}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "env":
        append(argv[1], env_record())
    elif cmd == "step":
        for rec in step_records(argv[2], int(argv[3]), float(argv[4]), argv[5:]):
            append(argv[1], rec)
    elif cmd == "summary":
        print(summary(argv[1]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
