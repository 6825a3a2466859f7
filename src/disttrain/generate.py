"""`python -m disttrain.generate --checkpoint RUN --prompt TEXT`: sample text from a trained language model.

The model is rebuilt like `disttrain.predict` does (weights and model.json from a run directory, its
model.safetensors or a checkpoints/step_* directory; a plug-in only with --trust-plugins or --model), and
the vocabulary saved with it (model.json's spec.vocab) encodes the prompt and decodes the output, so a run
reads back the very characters it trained on. Sampling is nanoGPT's: the last block_size tokens as
context, logits / temperature, optionally only the top-k kept, one draw from the softmax; all draws come
from one torch.Generator seeded by --seed, so the same seed, model and prompt print the same text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from disttrain.errors import EXIT_USAGE, UsageError, one_line


def _parser() -> argparse.ArgumentParser:
    from disttrain.config import _Parser

    p = _Parser(prog="python -m disttrain.generate", allow_abbrev=False,
                description="Generate text with a trained disttrain language model (--model gpt on text:PATH).")
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its model.safetensors, or a checkpoints/step_* directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature, > 0 (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens only (0: all)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--model", help="rebuild with this model (module:function or built-in) instead of the saved one")
    p.add_argument("--trust-plugins", action="store_true", help="import a plug-in model named in model.json")
    p.add_argument("--json", help="also write the samples to this JSON file")
    return p


@torch.inference_mode()
def sample(model: Any, idx: torch.Tensor, max_new_tokens: int, block_size: int, temperature: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend token ids [B, T] by `max_new_tokens` sampled tokens -> [B, T + max_new_tokens].

    `model` maps ids [B, t] (t <= block_size) to logits [B, t, vocab]; the context is cropped to the last
    `block_size` tokens (nanoGPT's generate)."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :].float() / temperature
        if top_k:
            v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
            logits[logits < v[:, [-1]]] = -float("inf")
        probs = torch.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def generate(checkpoint: str, prompt: str, max_new_tokens: int = 500, temperature: float = 0.8, top_k: int = 0,
             seed: int = 0, num_samples: int = 1, model: str | None = None,
             trust_plugins: bool = False) -> list[str]:
    """The prompt followed by `max_new_tokens` generated characters, `num_samples` times."""
    from disttrain.data.text import decode, encode
    from disttrain.predict import load_saved_model

    if max_new_tokens < 0 or num_samples < 1 or top_k < 0 or seed < 0:
        raise UsageError("--max-new-tokens and --top-k must be >= 0, --num-samples >= 1, --seed >= 0")
    if not temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {temperature}")
    net, spec, _ = load_saved_model(checkpoint, model, trust_plugins)
    if not spec.vocab:
        raise UsageError(f"--checkpoint {checkpoint}: not a language model (no vocabulary saved with it; train "
                         "one on --dataset text:PATH)")
    if not prompt:
        raise UsageError("--prompt must not be empty")
    device = next(net.parameters()).device
    ids = encode(prompt, spec.vocab).to(device).unsqueeze(0).repeat(num_samples, 1)
    g = torch.Generator().manual_seed(seed)
    out = sample(net, ids, max_new_tokens, spec.input_shape[0], temperature, top_k, g)
    return [decode(row.tolist(), spec.vocab) for row in out]


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        texts = generate(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                         args.seed, args.num_samples, args.model, args.trust_plugins)
    except UsageError as e:
        print(f"disttrain.generate: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    print("\n---\n".join(texts))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), "prompt": args.prompt,
                                               "seed": args.seed, "samples": texts}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
