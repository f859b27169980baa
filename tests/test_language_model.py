"""The language-model workload on a tiny GPT (2 layers, 32 dims) and a slice of the embedded corpus: each
piece in seconds, no torchrun."""

import math

import numpy as np
import pytest
import torch

from wattflow.compress.backends.onnx_int8 import export_onnx
from wattflow.compress.prune import prune_checkpoint
from wattflow.compress.wanda import input_norms, nm_mask, sparsify
from wattflow.config import PipelineConfig, parse_step
from wattflow.data import DataError, loader
from wattflow.datasets.text import decode, embedded_corpus, encode
from wattflow.evaluate import load_predictor
from wattflow.models import build_model, load_checkpoint, save_checkpoint
from wattflow.stages import Artifact, StageResult
from wattflow.steps.sparsify import SparsifyStep
from wattflow.train import torch_predictor
from wattflow.workloads import WorkloadError, check_workload, workload_for

TINY = {"n_layer": 2, "n_head": 4, "n_embd": 32}


def lm_config(tmp_path, text: str | None = None, **train) -> PipelineConfig:
    data = {"dataset": "text", "block_size": 16, "val_fraction": 0.1, "test_fraction": 0.1}
    if text is not None:
        (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
        data["path"] = str(tmp_path / "corpus.txt")
    return PipelineConfig.model_validate({"workload": "language-model", "data": data,
                                          "train": {"model": "gpt", "model_kwargs": {**TINY, **train}}})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(config, workload, a briefly trained tiny GPT) on the first 60k characters of the embedded corpus."""
    cfg = lm_config(tmp_path_factory.mktemp("lm"), embedded_corpus()[:60_000])
    workload = check_workload(cfg)
    torch.manual_seed(0)
    model = build_model(workload.model_spec())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step, (xb, yb) in enumerate(loader(workload.splits.train, 32, shuffle=True)):
        loss = workload.loss(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 120:
            break
    return cfg, workload, model.eval()


def test_text_splits_are_contiguous_windows_with_shifted_targets(small):
    _, workload, _ = small
    s = workload.splits
    x, y = s.train[0]
    assert x.dtype == torch.int64 and x.shape == (16,) and torch.equal(x[1:], y[:-1])
    assert s.input_shape == (16,) and s.input_dtype == "int64"
    vocab = s.preprocessing["vocab"]
    assert s.num_classes == len(vocab) and decode(encode("def f():", vocab), vocab) == "def f():"
    # test windows tile the last part of the text, in order
    first, second = s.test[0][0], s.test[1][0]
    assert s.test.starts[1] - s.test.starts[0] == 16 and not torch.equal(first, second)


def test_kv_cache_generation_equals_full_recompute(small):
    _, workload, model = small
    prompt = torch.from_numpy(workload.example_inputs(2))[:, :5]
    cached, full = model.generate(prompt, 40, use_cache=True), model.generate(prompt, 40, use_cache=False)
    assert cached.shape == (2, 45) and torch.equal(cached, full)  # past block_size (16) too: the cache restarts


def test_scores_are_per_token_and_perplexity_is_exp_loss(small):
    _, workload, model = small
    scores = workload.score(torch_predictor(model), workload.splits.test)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss_nats_per_token"]))
    assert 0.2 < scores["accuracy"] < 1.0  # trained: well above chance (1/vocab ~ 0.01)
    assert scores["perplexity"] < workload.splits.num_classes / 4


def test_onnx_export_scores_the_same(small, tmp_path):
    _, workload, model = small
    export_onnx(model, tmp_path / "gpt.onnx", [16], torch.int64)
    x = workload.example_inputs(8)
    np.testing.assert_allclose(load_predictor(tmp_path / "gpt.onnx", "onnx")(x), torch_predictor(model)(x),
                               atol=1e-4)


def test_wanda_keeps_exactly_the_per_row_top_k_of_weight_times_input_norm(small):
    _, workload, model = small
    model = build_model(workload.model_spec())
    model.load_state_dict(small[2].state_dict())
    layer = model.blocks[0].mlp.fc
    batches = [xb for _, (xb, _) in zip(range(4), loader(workload.splits.train, 16), strict=False)]
    norm = input_norms(model, [layer], batches)[layer]
    score = layer.weight.detach().abs() * norm[None, :]
    sparsify(model, {"fc": layer}, "wanda", 0.5, None, batches)
    k = layer.in_features // 2
    expected = torch.zeros_like(score, dtype=torch.bool).scatter_(1, torch.topk(score, k, dim=1).indices, True)
    assert torch.equal(layer.weight != 0, expected)
    assert (layer.weight == 0).sum(dim=1).tolist() == [k] * layer.out_features


def test_two_four_masks_keep_two_of_every_four():
    score = torch.rand(8, 32)
    mask = nm_mask(score, 2, 4)
    assert mask.reshape(8, 8, 4).sum(dim=2).eq(2).all()
    best = torch.topk(score.reshape(8, 8, 4), 2, dim=2).values.min(dim=2).values
    assert (score.reshape(8, 8, 4)[~mask.reshape(8, 8, 4)].reshape(8, 8, 2).max(dim=2).values <= best).all()


def test_two_four_on_a_width_not_a_multiple_of_four_names_the_layer():
    layer = torch.nn.Linear(6, 4)
    with pytest.raises(ValueError, match=r"multiples of 4.*'odd': 6"):
        sparsify(layer, {"odd": layer}, "magnitude", None, (2, 4), None)


@pytest.mark.parametrize("content, match", [
    (b"", "no text"), (b"\xff\xfe\x00binary\x89PNG", "not UTF-8"), ("short text " * 3, "fewer than 4 windows")])
def test_bad_text_is_refused_before_any_work(tmp_path, content, match):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = PipelineConfig.model_validate({"workload": "language-model", "data": {"dataset": "text", "path": str(path),
                                         "block_size": 16}, "train": {"model": "gpt"}})
    with pytest.raises(DataError, match=match):
        check_workload(cfg)


def test_heads_that_do_not_divide_the_width_name_the_field(tmp_path):
    cfg = lm_config(tmp_path, embedded_corpus()[:20_000], n_head=3)
    with pytest.raises(WorkloadError, match=r"train.model.*n_embd \(32\) must be divisible by n_head \(3\)"):
        workload_for(cfg).model_spec()


def test_head_pruning_removes_whole_heads_and_neurons_and_reloads(small, tmp_path):
    cfg, workload, model = small
    ckpt = tmp_path / "gpt.pt"
    save_checkpoint(ckpt, model, workload.model_spec(), workload.meta())
    out = prune_checkpoint(ckpt, tmp_path / "heads.pt", 0.5, workload.splits.train, fine_tune_epochs=0, lr=0.01,
                           method="structured", keep=("lm_head",), loss_fn=workload.loss)
    pruned, spec, _ = load_checkpoint(out.checkpoint, out.sha256)  # rebuilt from its spec, weights_only
    for block in pruned.blocks:
        assert block.attn.q.out_features == block.attn.k.out_features == block.attn.v.out_features == 16
        assert block.attn.q.out_features % block.attn.head_dim == 0  # 2 whole heads of 8 left of 4
        assert block.mlp.fc.out_features == 64 and block.attn.proj.out_features == 32  # residual width kept
    x = torch.from_numpy(workload.example_inputs(4))
    with torch.inference_mode():
        assert torch.isfinite(pruned(x)).all()
    assert torch.equal(pruned.generate(x[:, :4], 20, use_cache=True), pruned.generate(x[:, :4], 20, use_cache=False))
    assert out.params_after < 0.7 * out.params_before


def test_a_two_four_chain_on_a_model_with_narrow_layers_fails_before_any_work(tmp_path):
    cfg = lm_config(tmp_path, embedded_corpus()[:20_000], n_embd=36, n_head=4)  # head_dim 9: q/k/v fine, 36 % 4 == 0
    check_workload(cfg)
    narrow = cfg.model_copy(update={"train": cfg.train.model_copy(update={"model_kwargs": {**TINY, "n_embd": 18,
                                                                                           "n_head": 2}}),
                                    "chains": [cfg.chains[0].model_validate("wanda:2:4")]})
    with pytest.raises(WorkloadError, match=r"wanda:2:4.*multiples of 4.*blocks.0.attn.q': 18"):
        check_workload(narrow)


def test_a_short_fine_tune_after_wanda_keeps_every_pruned_weight_at_zero(small, tmp_path):
    cfg, workload, model = small
    ckpt = tmp_path / "gpt.pt"
    sha = save_checkpoint(ckpt, model, workload.model_spec(), workload.meta())
    source = StageResult(name="train", stage="train", chain=["train"], energy={"name": "train", "duration_s": 0.0,
                         "devices": []}, artifact=Artifact(path=str(ckpt), format="torch", sha256=sha))
    cfg = cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"lr": 0.01})})
    results = {}
    for token in ("wanda:2:4", "wanda:2:4,ft=1"):
        step = SparsifyStep.model_validate(parse_step(token))
        artifact, params, metrics = step.run(cfg, source, tmp_path, step.label())
        results[token] = load_checkpoint(artifact.path, artifact.sha256)[0]
        assert params["fine_tune_epochs"] == (1 if "ft" in token else 0)
        assert metrics["sparsity"] == pytest.approx(0.5)
    one_shot, tuned = results["wanda:2:4"], results["wanda:2:4,ft=1"]
    for (name, a), b in zip(one_shot.named_parameters(), tuned.parameters(), strict=True):
        if name.startswith("blocks.") and name.endswith("weight") and a.dim() == 2:  # the sparsified Linears
            assert torch.equal(a == 0, b == 0), name  # the same 2:4 pattern, still exactly 2 of every 4
    assert any(not torch.equal(a, b) for a, b in zip(one_shot.parameters(), tuned.parameters(), strict=True))
    score = workload.score(torch_predictor(tuned), workload.splits.val)["perplexity"]
    assert score < workload.score(torch_predictor(one_shot), workload.splits.val)["perplexity"]
