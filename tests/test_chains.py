from wattflow.chains import plan
from wattflow.config import parse_config


def test_shared_prefixes_run_once_and_parents_come_first():
    cfg = parse_config({"chains": ["prune:0.8", "prune:0.8 -> onnx-int8-static", "prune:0.8 -> bf16",
                                   "distill -> prune:0.9 -> kmeans-4bit", "bf16"]})
    steps = plan(cfg.chains)
    assert [s.name for s in steps] == ["prune-0.8", "prune-0.8+onnx-int8-static", "prune-0.8+bf16", "distill",
                                       "distill+prune-0.9", "distill+prune-0.9+kmeans-4bit", "bf16"]
    seen = {()}
    for s in steps:
        assert s.parent in seen
        seen.add(s.key)


def test_structured_and_unstructured_steps_have_distinct_labels():
    steps = plan(parse_config({"chains": ["prune:0.5", "channels:0.5"]}).chains)
    assert [s.name for s in steps] == ["prune-0.5", "channels-0.5"]
    assert steps[1].step.method == "structured"
