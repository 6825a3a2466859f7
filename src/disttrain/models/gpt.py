"""A decoder-only transformer language model (GPT), after nanoGPT's model.py (Karpathy, MIT licence).

Learned position embeddings, pre-norm blocks (LayerNorm -> causal self-attention / MLP -> residual),
causal attention through `torch.nn.functional.scaled_dot_product_attention` (the fused/flash kernels where
the device has them), input and output embeddings tied, dropout on embeddings, attention and residuals, and
GPT-2's initialisation: N(0, 0.02) everywhere, the residual output projections scaled by 1/sqrt(2 n_layer)
(GPT-2 paper, section 2.3: each block adds twice to the residual stream).

The blocks live in an `nn.ModuleList` named `blocks`, so FSDP can shard block by block. The output head
is `F.linear(x, wte.weight)`: the tie is structural, so the state dict holds one tensor (`wte.weight`),
loads cannot untie it and checkpoints never see shared storage.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from disttrain.errors import UsageError


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        # [B, T, C] -> [B, heads, T, head size]
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids [B, T] (T <= block_size, int64) -> next-token logits [B, T, vocab_size] (float)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0, bias: bool = False):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                        ("n_head", n_head), ("n_embd", n_embd)):
            if not isinstance(v, int) or v <= 0:
                raise UsageError(f"--model gpt: {name} must be a positive integer, got {v!r}")
        if n_embd % n_head:
            raise UsageError(f"--model gpt: n_embd {n_embd} must be a multiple of n_head {n_head}")
        if not 0 <= dropout < 1:
            raise UsageError(f"--model gpt: dropout must be in [0, 1), got {dropout}")
        self.block_size = block_size
        # the embeddings' own N(0, 1) draw is skipped (_weight): _init_weights draws them below, and on the meta
        # device (models.build_model counts parameters there before allocating) normal_ would import
        # torch._dynamo, ~2 s of every start-up
        self.wte = nn.Embedding(vocab_size, n_embd, _weight=torch.empty(vocab_size, n_embd))  # the output head too
        self.wpe = nn.Embedding(block_size, n_embd, _weight=torch.empty(block_size, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        if self.wte.weight.is_meta:  # counted, never used: nothing to initialise
            return
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the projections into the residual
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size {self.block_size}")
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied output head


def gpt(input_shape: list[int], num_outputs: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
        dropout: float = 0.0, bias: bool = False) -> nn.Module:
    """`--model gpt`: block_size from the data's window length, vocab_size from its vocabulary.
    Defaults are nanoGPT's small CPU configuration (4 layers, 4 heads, width 128)."""
    if len(input_shape) != 1:
        raise UsageError(f"--model gpt needs token windows (a text dataset such as text:PATH), got input "
                         f"shape {input_shape}")
    return GPT(num_outputs, input_shape[0], n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout,
               bias=bias)
