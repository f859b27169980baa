"""A decoder-only transformer language model in the style of nanoGPT: token + position embeddings, pre-norm
blocks of causal self-attention and an MLP, a final norm and a linear head (tied to the token embedding or
not). Every projection is an `nn.Linear` (q, k and v separate), so magnitude/Wanda pruning, 2:4 sparsity and
torch-pruning's head and neuron removal all see plain Linear layers.

The number of heads follows from the q projection's width (`head_dim` is fixed), so a model whose heads were
removed by structured pruning runs without any attribute edit.

    model = GPT(vocab_size=96, block_size=64, n_layer=4, n_head=4, n_embd=128)
    logits = model(tokens)                      # [N, T] int64 -> [N, T, vocab] scores of the next token
    model.generate(prompt, 100)                 # greedy, with a KV cache
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wattflow.zoo import MODELS

Cache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys and values [N, heads, T_past, head_dim]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        width = n_head * head_dim
        self.q, self.k, self.v = (nn.Linear(n_embd, width) for _ in range(3))
        self.proj = nn.Linear(width, n_embd)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # With a cache the new tokens are the latest, and one new token may see every cached one.
        causal = past is None or t > 1
        if past is not None and t > 1:
            raise ValueError("a cached forward takes one new token at a time")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(n, t, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden)
        self.proj = nn.Linear(hidden, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_dim: int, mlp_hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, head_dim)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, mlp_hidden)

    def forward(self, x, past=None):
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


@MODELS.register("gpt")
class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 mlp_ratio: int = 4, tied: bool = False):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, n_embd // n_head, mlp_ratio * n_embd)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init)
        if tied:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init(m: nn.Module) -> None:  # GPT-2's: N(0, 0.02) weights, zero biases
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.step(tokens)[0]

    def pruning_hints(self) -> dict:
        """For structured pruning (torch-pruning): remove whole attention heads (q, k and v together) and MLP
        neurons; keep the residual width (embeddings, norms, the output projections and the head)."""
        heads = {p: b.attn.q.out_features // b.attn.head_dim for b in self.blocks
                 for p in (b.attn.q, b.attn.k, b.attn.v)}
        fixed = [self.wte, self.wpe, self.ln_f, self.lm_head,
                 *(m for b in self.blocks for m in (b.ln_1, b.ln_2, b.attn.proj, b.mlp.proj))]
        return {"num_heads": heads, "ignored_layers": fixed}

    def step(self, tokens: torch.Tensor, cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """Logits for `tokens` [N, T] following the cached ones, and the cache extended by them."""
        start = 0 if not cache else cache[0][0].shape[2]
        if start + tokens.shape[1] > self.block_size:
            raise ValueError(f"{start + tokens.shape[1]} positions exceed block_size {self.block_size}")
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        new_cache: Cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cache[i] if cache else None)
            new_cache.append(kv)
        return self.lm_head(self.ln_f(x)), new_cache

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, new_tokens: int, use_cache: bool = True) -> torch.Tensor:
        """Greedy continuation of `prompt` [N, T0] by `new_tokens` tokens, [N, T0 + new_tokens]. With the KV
        cache each step computes one position; without it each step recomputes the whole window (the same
        tokens, more work). The context is the last `block_size` tokens: the cache restarts when it is full."""
        out, cache = prompt, None
        for _ in range(new_tokens):
            if use_cache and cache is not None and cache[0][0].shape[2] < self.block_size:
                logits, cache = self.step(out[:, -1:], cache)
            else:
                logits, cache = self.step(out[:, -self.block_size:])
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out

    @staticmethod
    def spec(input_shape: list[int], num_classes: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
             mlp_ratio: int = 4, tied: bool = False) -> dict:
        """The spec of a GPT over windows of `input_shape` = [block_size] tokens of a `num_classes` vocabulary."""
        if len(input_shape) != 1:
            raise ValueError(f"gpt takes token windows [block_size]; the data gives samples of shape {input_shape}")
        if n_embd % n_head:
            raise ValueError(f"train.model_kwargs: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        return {"kind": "gpt", "vocab_size": num_classes, "block_size": int(input_shape[0]), "n_layer": n_layer,
                "n_head": n_head, "n_embd": n_embd, "mlp_ratio": mlp_ratio, "tied": tied}
