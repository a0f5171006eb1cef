"""Greedy generation with a KV cache in Hugging Face transformers: fastattn against PyTorch's SDPA.

    python examples/generate_kvcache.py [--batch 4] [--prompt 16] [--new-tokens 32] [--layers 2]
                                        [--dtype float32] [--device cpu]

A small randomly initialised Llama (GQA, no download) generates greedily from the same prompts twice:
with attn_implementation="sdpa", and with "fastattn", where the prefill runs fastattn.attention and
every decoding step fastattn.attention_with_kvcache over transformers' own cache. The tokens must be
identical; each run's tokens/s is printed (after a warm-up run, best of --repeats), with the fastattn
backend that ran the decoding steps (the reference until a fused kernel for it is built).
"""
import argparse
import copy
import time

import torch

import fastattn.integrations.transformers as fa_hf
from fastattn.backends import Problem, select


def build_model(layers, hidden, heads, kv_heads, vocab, dtype, device, seed=0):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, max_position_embeddings=4096,
                                   initializer_range=0.1)  # logits spread wide enough that greedy picks no tie
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def timed_generate(model, prompts, new_tokens, repeats):
    """(tokens, best seconds) of greedy generation of exactly ``new_tokens`` per prompt."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    best, out = float("inf"), None
    with torch.no_grad():
        model.generate(prompts, **kw)  # warm-up
        for _ in range(repeats):
            if prompts.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(prompts, **kw)
            if prompts.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    fa_hf.register()
    ref = build_model(args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, getattr(torch, args.dtype),
                      args.device)
    ref.set_attn_implementation("sdpa")
    model = copy.deepcopy(ref)
    model.set_attn_implementation("fastattn")  # <- the one-line swap
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=gen).to(args.device)

    D = args.hidden // args.heads
    decode = select("auto", Problem("attention_kvcache", prompts.device.type, ref.dtype, D=D, Dv=D)).name
    print(f"Llama, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), head dim {D}, {args.dtype}, "
          f"{args.device}; fastattn decodes on its {decode!r} backend")
    results = {}
    for name, m in (("sdpa", ref), ("fastattn", model)):
        tokens, seconds = timed_generate(m, prompts, args.new_tokens, args.repeats)
        results[name] = tokens
        rate = args.batch * args.new_tokens / seconds
        print(f"{name:>9}: {args.batch} x {args.new_tokens} new tokens in {seconds * 1e3:8.1f} ms  "
              f"{rate:9.1f} tokens/s")
    same = torch.equal(results["sdpa"], results["fastattn"])
    print("identical tokens" if same else "tokens differ")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
