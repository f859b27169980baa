"""Security: checkpoints load only as weights (a planted malicious pickle is refused and never runs), servers
bind to loopback, and secrets in the environment or the configuration never reach MLflow or the journal."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from per_run import mlflow_store

from wattflow.config import EnergyConfig, parse_config
from wattflow.energy import DeviceEnergy, EnergyResult
from wattflow.models import CheckpointError, build_model, default_spec, load_checkpoint, save_checkpoint
from wattflow.stages import Artifact, StageResult, VariantFigures
from wattflow.tracking import JOURNAL_NAME, STAGE_TAG, Tracker, record_evaluation, record_stage

ROOT = Path(__file__).resolve().parents[1]


class PlantedPayload:
    """Unpickling this would run `open(marker, "w")`: the classic pickle exploit, harmless but visible."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_planted_as_a_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    planted = tmp_path / "model.pt"
    spec = default_spec("mlp", mlp_hidden=[4])
    state = build_model(spec).state_dict()
    torch.save({"spec": spec, "state_dict": state, "meta": {"x": PlantedPayload(marker)}}, planted)
    with pytest.raises(CheckpointError, match=f"checkpoint {planted} was refused.*GLOBAL.*could run code"):
        load_checkpoint(planted)
    from wattflow.evaluate import load_predictor

    with pytest.raises(CheckpointError):
        load_predictor(str(planted), "torch", 1)
    assert not marker.exists()


def torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, passes weights_only=True) for every torch.load(...) call in a Python file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def source_files() -> list[Path]:
    return sorted(p for d in ("wattflow", "flows", "tasks", "bench") for p in (ROOT / d).rglob("*.py"))


def test_every_torch_load_in_the_code_passes_weights_only_true():
    unsafe, seen = [], 0
    for path in source_files():
        for line, safe in torch_load_calls(path):
            seen += 1
            if not safe:
                unsafe.append(f"{path.relative_to(ROOT)}:{line}")
    assert seen >= 3, "the scan found no torch.load calls: is it looking in the right place?"
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"


def test_no_code_unpickles_or_loads_pickled_numpy():
    pattern = re.compile(r"\bpickle\.loads?\(|\bdill\.|allow_pickle\s*=\s*True|weights_only\s*=\s*False")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in source_files()
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_makefile_servers_bind_to_loopback():
    makefile = (ROOT / "Makefile").read_text()
    hosts = re.findall(r"--host[= ]+(\S+)", makefile)
    assert hosts, "no --host in the Makefile: servers would bind to their defaults"
    for host in hosts:
        value = host
        if match := re.fullmatch(r"\$\(?(\w+)\)?", host):  # a variable: its default must be loopback
            default = re.search(rf"^{match[1]}\s*\??=\s*(\S+)", makefile, re.MULTILINE)
            assert default, f"{host} has no default in the Makefile"
            value = default[1]
        assert value in ("127.0.0.1", "localhost", "::1"), f"a server binds to {host} ({value})"
    assert "0.0.0.0" not in makefile
    # make server / make worker: deployments/servers.sh binds $BIND_HOST, whose default is loopback everywhere
    assert re.search(r"^BIND_HOST\s*\?=\s*127\.0\.0\.1\s*$", makefile, re.MULTILINE)
    servers_sh = (ROOT / "deployments" / "servers.sh").read_text()
    assert '"${BIND_HOST:-127.0.0.1}"' in servers_sh and "--host \"$host\"" in servers_sh


SECRET_TOKEN = "tok-s3cr3t-7f3a9"
SECRET_PASSWORD = "pw-s3cr3t-42bd"
DB_URL = f"postgresql://wattflow:{SECRET_PASSWORD}@db.internal:5432/mlflow"


def tiny_stage(checkpoint: Path) -> StageResult:
    energy = EnergyResult("train", 0.2, (DeviceEnergy("cpu:process-tree", 1.0, "estimated:cpu-time"),))
    return StageResult(name="train", stage="train", chain=["train"], energy=energy.to_dict(),
                       params={"note": f"trained against {DB_URL} with token {SECRET_TOKEN}"},
                       artifact=Artifact(path=str(checkpoint), format="torch", sha256="0" * 64))


def test_secrets_never_reach_mlflow_params_tags_artifacts_or_the_journal(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET_TOKEN)
    monkeypatch.setenv("WATTFLOW_DATABASE_PASSWORD", SECRET_PASSWORD)
    monkeypatch.setenv("DATABASE_URL", DB_URL)
    cfg = parse_config({"energy": {"carbon_intensity_source": f"grid API {DB_URL}?token={SECRET_TOKEN}"}})
    spec = default_spec("mlp", mlp_hidden=[4])
    checkpoint = tmp_path / "run" / "train" / "model.pt"
    save_checkpoint(checkpoint, build_model(spec), spec)

    tracker = Tracker(mlflow_store(tmp_path), journal_dir=tmp_path / "run")
    experiment = tracker.experiment_id("secrets")
    with tracker.run(experiment, "pipeline", tags={STAGE_TAG: "pipeline", "source": os.environ["DATABASE_URL"]},
                     params=cfg.model_dump()) as parent:
        trained = record_stage(tracker, parent, "train", "train", lambda: tiny_stage(checkpoint), cfg.energy,
                               log_model=False)
        record_evaluation(tracker, trained.mlflow_run_id,
                          VariantFigures(scores={"accuracy": 0.9}, deployable_path=DB_URL))

        def leaky_failure():
            raise ConnectionError(f"could not reach {DB_URL} (token {SECRET_TOKEN})")

        with pytest.raises(ConnectionError):
            record_stage(tracker, parent, "bf16", "quantize", leaky_failure, EnergyConfig(), log_model=False)

    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([experiment])
    assert len(runs) == 3
    texts = [(tmp_path / "run" / JOURNAL_NAME).read_text()]
    for run in runs:
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        texts += [Path(a.path).name + ":" + (Path(run.info.artifact_uri.removeprefix("file://")) / a.path).read_text()
                  for folder in client.list_artifacts(run.info.run_id) if folder.is_dir
                  for a in client.list_artifacts(run.info.run_id, folder.path)]
    everything = "\n".join(texts)
    assert SECRET_TOKEN not in everything and SECRET_PASSWORD not in everything
    # logged, but masked: the user still sees where it came from
    assert "postgresql://wattflow:***@db.internal:5432/mlflow" in everything
    failed = next(r for r in runs if r.info.run_name == "bf16")
    assert failed.info.status == "FAILED" and "***" in failed.data.tags["error"]
