"""int8 on the language model, CPU, one thread, on one char-level GPT trained here (4 layers, 4 heads, 128 dims,
context 64; the LM table's architecture, 2 epochs on 1 rank):

1. Scoring pass at batch 64: fp32 eager vs ONNX Runtime int8 dynamic vs torchao int8 dynamic (compiled, as the
   pipeline's runtime does), medians of alternating rounds — which int8 path is faster here (the pipeline's LM
   recipe uses the faster one).
2. Greedy generation at batch 1 from an 8-token prompt, energy per 1k generated tokens in metered windows:
   fp32 eager with the KV cache, torchao int8 dynamic eager with the KV cache (a torch module, so it keeps the
   cache), and the ONNX Runtime int8 model (the LM pipeline's champion), which has no cache: each token
   re-scores the window (right-padded to the fixed export length; causal, so the padding cannot change it).

Writes bench/results/lm_int8.json.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.language_model import lm_cfg
from bench.machine import machine
from bench.scale import launch
from wattflow.compress.quantize import quantize_checkpoint
from wattflow.compress.torchao_backend import quantize_model
from wattflow.config import EnergyConfig, PipelineConfig
from wattflow.energy import make_meter
from wattflow.evaluate import load_predictor
from wattflow.models import load_checkpoint
from wattflow.workloads import workload_for


def scoring_latency_s(predictors: dict, x: np.ndarray, rounds: int) -> dict[str, float]:
    for predict in predictors.values():
        predict(x)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(rounds):  # alternating: drift hits every path alike
        for name, predict in predictors.items():
            start = time.perf_counter()
            predict(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def onnx_generate(predict, prompt: np.ndarray, new_tokens: int, block_size: int) -> np.ndarray:
    """Greedy continuation without a cache: each token re-scores the last `block_size` tokens."""
    out = prompt
    for _ in range(new_tokens):
        window = out[:, -block_size:]
        padded = np.zeros((1, block_size), dtype=np.int64)
        padded[:, :window.shape[1]] = window
        logits = predict(padded)
        out = np.concatenate([out, logits[:, window.shape[1] - 1].argmax(-1)[:, None]], axis=1)
    return out


def run(quick: bool, results: Path) -> list[dict]:
    torch.set_num_threads(1)
    rounds, new_tokens = (3, 64) if quick else (7, 256)
    meter = make_meter(EnergyConfig())
    with tempfile.TemporaryDirectory(prefix="wattflow-bench-lm-int8-") as tmp:
        checkpoint = launch(lm_cfg(1, 1 if quick else 2), Path(tmp) / "train")["checkpoint"]
        model, spec, _meta = load_checkpoint(checkpoint)
        block = spec["block_size"]
        x = np.random.default_rng(0).integers(0, spec["vocab_size"], (64, block)).astype(np.int64)
        ort = quantize_checkpoint(checkpoint, "onnx-int8-dynamic", tmp, x[:16])
        ao = quantize_checkpoint(checkpoint, "torchao-int8-dynamic", tmp, x[:16])
        started = time.perf_counter()
        predictors = {"fp32 eager": load_predictor(checkpoint, "torch"), "ort int8 dynamic":
                      load_predictor(ort.path, ort.format), "torchao int8 dynamic (compiled)":
                      load_predictor(ao.path, ao.format)}
        compile_s = time.perf_counter() - started
        scoring = scoring_latency_s(predictors, x, rounds)
        workload = workload_for(PipelineConfig.model_validate(lm_cfg(1, 1)))
        perplexity = {name: round(workload.score(p, workload.splits.test)["perplexity"], 4)
                      for name, p in predictors.items()}

        fp32 = model.eval()
        int8_eager, _ = quantize_model(copy.deepcopy(model), "torchao-int8-dynamic")
        prompt = torch.zeros(1, 8, dtype=torch.int64)
        paths = {"fp32 eager, KV cache": lambda: fp32.generate(prompt, new_tokens),
                 "torchao int8 dynamic eager, KV cache": lambda: int8_eager.generate(prompt, new_tokens),
                 "ort int8 dynamic, no cache (the LM champion)": lambda: onnx_generate(
                     predictors["ort int8 dynamic"], prompt.numpy(), new_tokens, block)}
        energy: dict[str, list[float]] = {name: [] for name in paths}
        rate: dict[str, list[float]] = {name: [] for name in paths}
        with torch.inference_mode():
            for generate in paths.values():
                generate()  # warm-up
            for _ in range(rounds):
                for name, generate in paths.items():
                    with meter.window(name) as w:
                        generate()
                    energy[name].append(1e3 * w.result.energy_j / new_tokens if w.result.energy_j else float("nan"))
                    rate[name].append(new_tokens / w.result.duration_s)
            same = torch.equal(fp32.generate(prompt, new_tokens), int8_eager.generate(prompt, new_tokens))
    generation = {name: {"energy_per_1k_generated_tokens_j": statistics.median(energy[name]),
                         "tokens_per_s": statistics.median(rate[name])} for name in paths}
    out = {"row": "lm_int8", "machine": machine(), "threads": 1, "rounds": rounds, "new_tokens": new_tokens,
           "energy_method": meter.method_summary, "scoring_b64_latency_s": scoring, "test_perplexity": perplexity,
           "torchao_compile_and_warmup_s": compile_s, "generation": generation,
           "int8_eager_same_greedy_tokens_as_fp32": same}
    (results / "lm_int8.json").write_text(json.dumps(out, indent=2))

    base = scoring["fp32 eager"]
    ort_x, ao_x = base / scoring["ort int8 dynamic"], base / scoring["torchao int8 dynamic (compiled)"]
    fp32_j = generation["fp32 eager, KV cache"]["energy_per_1k_generated_tokens_j"]
    best_name = min((n for n in generation if n != "fp32 eager, KV cache"),
                    key=lambda n: generation[n]["energy_per_1k_generated_tokens_j"])
    best_j = generation[best_name]["energy_per_1k_generated_tokens_j"]
    # torchao's eager and compiled modules compute the same int8 model
    best_ppl = perplexity["ort int8 dynamic" if best_name.startswith("ort") else "torchao int8 dynamic (compiled)"]
    best_ppl_pct = 100 * (best_ppl / perplexity["fp32 eager"] - 1)
    return [
        {"row": "LM: int8 dynamic on CPU, ONNX Runtime vs torchao", "figure": "scoring b64 speed-up over fp32 eager, "
         f"ORT / torchao compiled (compile {compile_s:.0f} s), medians of {rounds}", "value":
         f"{ort_x:.2f} / {ao_x:.2f}", "target": "the faster is the LM's int8 path (ORT)", "met": ort_x >= ao_x},
        {"row": "LM: energy per 1k generated tokens, batch 1", "figure": f"fp32 eager (KV cache) / best int8 "
         f"({best_name}; {meter.method_summary}; fp32 {fp32_j:.3g} J; its test perplexity "
         f"{best_ppl_pct:+.2f}%)", "value": round(fp32_j / best_j, 2), "target": ">= 2 within +5% ppl",
         "met": fp32_j / best_j >= 2 and best_ppl_pct <= 5},
    ]
