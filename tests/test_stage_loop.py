"""The stage loop the flow and the bench's bare script share (wattflow.stage_loop), with a recording runner."""

from wattflow.config import PipelineConfig
from wattflow.stage_loop import run_stages
from wattflow.steps.distill import DistillStep
from wattflow.steps.quantize import QuantizeStep


class Variant(str):
    @property
    def name(self) -> str:
        return str(self)


class Recorder:
    def __init__(self):
        self.calls = []

    def train(self):
        self.calls.append(("train",))
        return Variant("train")

    def step(self, planned, source):
        self.calls.append(("step", planned.name, source))
        return Variant(planned.name)

    def skip(self, planned, reason):
        self.calls.append(("skip", planned.name, reason))

    def evaluate(self, variant):
        self.calls.append(("evaluate", variant))
        return f"figures of {variant}"

    def measure(self, variants, figures):
        self.calls.append(("measure", tuple(variants), tuple(figures)))
        return [f"measured {v}" for v in variants]

    def progress(self, done, total, text):
        self.calls.append(("progress", done, total))


def test_the_loop_runs_each_prefix_once_skips_what_cannot_run_and_measures_every_variant_together(monkeypatch):
    cfg = PipelineConfig(chains=["prune:0.5 -> onnx-int8-static", "prune:0.5 -> bf16", "distill:0.5 -> bf16"])
    monkeypatch.setattr(QuantizeStep, "available", lambda self, cfg: (self.label() != "onnx-int8-static",
                                                                  "no ORT here"))
    monkeypatch.setattr(DistillStep, "available", lambda self, cfg: (False, "no teacher here"))
    runner = Recorder()
    variants, figures, total = run_stages(cfg, runner)

    assert variants == ["train", "prune-0.5", "prune-0.5+bf16"]
    assert figures == ["measured train", "measured prune-0.5", "measured prune-0.5+bf16"]
    work = [c for c in runner.calls if c[0] != "progress"]
    assert work == [
        ("train",),
        ("step", "prune-0.5", "train"),  # the shared prefix once, its children fed from its result
        ("skip", "prune-0.5+onnx-int8-static", "no ORT here"),
        ("step", "prune-0.5+bf16", "prune-0.5"),
        ("skip", "distill", "no teacher here"),
        ("skip", "distill+bf16", "its input was skipped"),
        ("evaluate", "train"), ("evaluate", "prune-0.5"), ("evaluate", "prune-0.5+bf16"),
        ("measure", tuple(variants), ("figures of train", "figures of prune-0.5", "figures of prune-0.5+bf16")),
    ]
    progress = [c[1:] for c in runner.calls if c[0] == "progress"]
    assert progress[-1][0] == progress[-1][1]  # the bar ends full
    assert total.name == "pipeline" and total.method  # the loop's own energy window, with its method
