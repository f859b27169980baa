"""What a benchmark ran on: recorded in every results row."""

from __future__ import annotations

import os
import platform
import socket
from importlib.metadata import version


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, str | int]:
    return {"host": socket.gethostname(), "cpu_model": cpu_model(), "cores": os.cpu_count() or 0,
            "python": platform.python_version(), "torch": version("torch"), "prefect": version("prefect"),
            "mlflow": version("mlflow"), "onnxruntime": version("onnxruntime")}
