"""Generation speed: llmtrain's Generator against Hugging Face `generate` on the same weights, in one process.

    python bench/generate.py                       # GPT-2 tiny and 124M (random init), batch 1 and 16, CPU
    python bench/generate.py --device cuda --compile --sizes 124M
    python bench/generate.py --sizes tiny --batch 1 --new-tokens 200 --repeat 5
    python bench/generate.py --sizes llama-tiny smollm2-135M --batch 1   # the Llama family (LlamaForCausalLM)

Greedy decoding of `--new-tokens` tokens after a short prompt, no early stop; each figure is the best of
`--repeat` timed runs after one warm-up. Prints a markdown table: new tokens/s for ours and HF, and the ratio.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

SIZES = {  # GPT-2: name -> (n_layer, n_head, n_embd, n_positions, vocab)
    "tiny": (4, 4, 128, 256, 2048),  # the default run's model (conf/model/gpt2_tiny.yaml, BPE 2048)
    "124M": (12, 12, 768, 1024, 50257),
}
LLAMA = {  # the Llama family: name -> LlamaConfig keywords
    "llama-tiny": dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
                       intermediate_size=352, max_position_embeddings=256, vocab_size=2048),  # conf/model/llama_tiny
    "smollm2-135M": dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                         intermediate_size=1536, max_position_embeddings=2048, vocab_size=49152, rope_theta=100000.0),
}


def models(size: str) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(transformers' model, llmtrain's native model on the same random weights, vocabulary)."""
    torch.manual_seed(0)
    if size in LLAMA:
        from transformers import LlamaConfig, LlamaForCausalLM

        from llmtrain.models.llama.convert import from_hf

        kw = LLAMA[size]
        V = kw["vocab_size"]
        hf = LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=True, bos_token_id=V - 1, eos_token_id=V - 1))
        return hf.eval(), from_hf(hf.config.to_dict(), hf.state_dict()), V
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmtrain.models.gpt2_native import GPT2, GPT2Dims, from_hf_state

    L, H, C, ctx, V = SIZES[size]
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=ctx, n_embd=C, n_layer=L, n_head=H,
                                    bos_token_id=V - 1, eos_token_id=V - 1)).eval()
    d = GPT2Dims(vocab_size=V, n_positions=ctx, n_embd=C, n_layer=L, n_head=H, eos_token_id=V - 1)
    native = GPT2(d)
    native.load_state_dict(from_hf_state(hf.state_dict(), d))
    return hf, native, V


def best_of(fns: list, repeat: int) -> list[float]:
    """Best wall time of each function; the functions take turns, so a noisy machine slows them alike."""
    for fn in fns:
        fn()  # warm-up (and compilation)
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=[*SIZES, *LLAMA])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="also time Generator(compile=True)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from llmtrain.data.tokenizers import byte_tokenizer
    from llmtrain.generation import Generator
    from llmtrain.precision import resolve

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = resolve(args.dtype, device).dtype
    tok = byte_tokenizer()  # prompts only; the models' vocabularies are the table's
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, dtype {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, greedy, "
          f"{args.new_tokens} new tokens, best of {args.repeat}")
    print("| model | batch | llmtrain tok/s | HF generate tok/s | ratio |" + (" compiled tok/s |" if args.compile else ""))
    print("|---|---|---|---|---|" + ("---|" if args.compile else ""))
    for size in args.sizes:
        hf, native, V = models(size)
        gen = Generator(native, tok, device, dtype)
        hf = hf.to(device=device, dtype=dtype)
        fast = Generator(native, tok, device, dtype, compile=True) if args.compile else None
        for b in args.batch:
            prompts = ["def main():"] * b
            kw = dict(max_new_tokens=args.new_tokens, do_sample=False, stop_at_eos=False, batch_size=b)
            ids = torch.tensor([tok.encode(prompts[0])] * b, device=device) % V
            fns = [partial(gen, prompts, **kw),
                   partial(hf.generate, ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=V - 1)]
            if fast is not None:
                fns.append(partial(fast, prompts, **kw))
            times = best_of(fns, args.repeat)
            n = args.new_tokens * b
            row = f"| {size} | {b} | {n / times[0]:,.0f} | {n / times[1]:,.0f} | {times[1] / times[0]:.2f}× |"
            if fast is not None:
                row += f" {n / times[2]:,.0f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
