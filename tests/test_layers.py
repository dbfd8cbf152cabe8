"""The core (`seg` minus `seg.tuning`) never imports ray, optuna or mlflow, and does nothing at import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

FORBIDDEN = ("ray", "optuna", "mlflow")


def test_importing_the_core_imports_no_tuning_or_tracking_library() -> None:
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import torch
        threads = torch.get_num_threads()
        import seg
        core = sorted(m.name for m in pkgutil.walk_packages(seg.__path__, "seg.")
                      if not m.name.startswith("seg.tuning"))
        for name in core:
            importlib.import_module(name)
        loaded = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "optuna", "mlflow"})
        print(json.dumps({"core": core, "loaded": loaded, "threads_changed": torch.get_num_threads() != threads}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # the modules this test exists for must be among those imported
    assert {"seg.engine", "seg.checkpoint", "seg.visualize", "seg.metrics", "seg.models"} <= set(report["core"])
    assert report["loaded"] == [], f"the core imported {report['loaded']}"
    assert not report["threads_changed"], "importing the core changed torch's thread count"
