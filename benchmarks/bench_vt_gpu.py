"""Visual-thought drawing and decoding of the janus-pro and emu3 backends, ours beside transformers'.

For each model, one at a time (the GPU memory of one is freed before the next is built):
* drawing: seconds per image and per generated image token at each ``--batches`` size, ours
  (``visual_thought.draw_codes`` + ``decode_codes``) beside transformers' own image generation
  on the same text prompts and settings (Janus-Pro: ``JanusForConditionalGeneration.generate(...,
  generation_mode="image")``; Emu3: ``generate`` with ``negative_prompt_ids``, guidance and a
  ``prefix_allowed_tokens_fn`` that allows visual tokens and an end-of-line token per row), each
  followed by the VQ decoder; and ours from a problem image and question
  (``Backend.generate_visual_thought``, what training draws);
* decoding: tokens/s of the on-policy sampler (``BatchedSampler``, prefill included) and of the
  decode steps alone, at each ``--decode-batches`` size.

``--size real`` builds Janus-Pro-7B and Emu3-Gen (8B) at their released sizes with random bf16
weights drawn on the GPU (nothing is downloaded): the backend reads a directory holding the
real-size config.json and a tokenizer made in code (the debug flavours' byte-level tokenizers,
Emu3's with all 32,768 visual tokens) beside an empty weights file it never reads, so prompts
have about the lengths of the real tokenizers' and every weight has the real shape. Janus-Pro
draws 384x384 images (576 tokens); Emu3 its configured grid (``--emu3-grid``, default the
backend's 32x32 tokens, 256x256 pixels). Weights are random, so the images are noise; the
arithmetic is the real models'.

    python benchmarks/bench_vt_gpu.py [--json out.json]
    python benchmarks/bench_vt_gpu.py --size debug --device cpu --batches 1 2 --decode-batches 1 2 --decode-tokens 8
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from opsd_core.api import Problem
from opsd_core.api.backend import BatchedSampler

JANUS_PRO_7B = dict(
    text_config=dict(
        model_type="llama", vocab_size=102_400, hidden_size=4096, intermediate_size=11_008, num_hidden_layers=30,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16_384,
    ),
    vision_config=dict(image_size=384, patch_size=16, num_image_tokens=576, projection_dim=4096),
    vq_config=dict(num_embeddings=16_384, embed_dim=8, projection_dim=4096, image_token_embed_dim=4096),
)
"""Janus-Pro-7B's sizes: a 30-layer DeepSeek-LLM 7B, SigLIP-L at 384 pixels (transformers'
defaults otherwise), a 16,384-code VQ model drawing 24x24 tokens."""
EMU3_CODEBOOK = 32_768
EMU3_IMAGE_PIXELS = (256 * 256, 512 * 512)  # the image bounds of examples/emu3-draw.toml


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def picture(side: int, seed: int) -> torch.Tensor:
    return torch.rand(3, side, side, generator=torch.Generator().manual_seed(seed))


def random_model(model_class, config, device: str, dtype: torch.dtype):
    """``model_class(config)`` with random weights, built on ``device`` in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------------------------ Janus-Pro
def janus(size: str, directory: Path, device: str, dtype: torch.dtype):
    from opsd_janus.backend import JanusBackend
    from opsd_janus.config import JanusParams
    from opsd_janus.context import IMAGE_TOKEN
    from opsd_janus.debug import debug_tokenizer
    from transformers import JanusConfig, JanusForConditionalGeneration

    if size == "debug":
        backend = JanusBackend(JanusParams(flavour="debug", image_size=32)).place(device, dtype)
        return backend, backend.build_model().eval()
    tokenizer = debug_tokenizer()
    tokenizer.save_pretrained(str(directory))
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = JanusConfig(
        text_config={**JANUS_PRO_7B["text_config"], **ids},
        vision_config=JANUS_PRO_7B["vision_config"],
        vq_config=JANUS_PRO_7B["vq_config"],
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=False,
    )
    config.save_pretrained(str(directory))
    (directory / "model.safetensors").touch()
    backend = JanusBackend(JanusParams(checkpoint=str(directory))).place(device, dtype)
    return backend, random_model(JanusForConditionalGeneration, backend.config, device, dtype)


def janus_prompts(backend, count: int) -> list:
    from opsd_janus import context as chat
    from opsd_janus.backend import Rendered

    ids = backend.ids
    texts = [f"a diagram of the path through maze {i}, drawn in thin blue lines" for i in range(count)]
    return [Rendered(tokens=[ids["bos"], *backend.encode(chat.USER_OPEN + t + chat.ASSISTANT_OPEN), ids["image_start"]]) for t in texts]


def janus_ours(backend, model, prompts: list, seed: int) -> None:
    from opsd_janus import visual_thought

    rows = [*prompts, *(visual_thought.unconditional_prompt(backend, p) for p in prompts)]
    codes = visual_thought.draw_codes(backend, model, rows, torch.Generator().manual_seed(seed))
    visual_thought.decode_codes(backend, model, codes)


def janus_generate(backend, model, prompts: list, seed: int) -> None:
    from transformers import GenerationConfig

    ids, params = backend.ids, backend.params
    input_ids, attention = left_padded([p.tokens for p in prompts], ids["pad"], model.device)
    sampled = params.vt_temperature > 0
    settings = GenerationConfig(
        do_sample=sampled, temperature=params.vt_temperature if sampled else None, top_k=params.vt_top_k, top_p=None,
        guidance_scale=params.vt_guidance_scale, bos_token_id=ids["bos"], pad_token_id=ids["pad"],
        eos_token_id=ids["eos"], generation_kwargs={"boi_token_id": ids["image_start"]},
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        codes = model.generate(input_ids, attention_mask=attention, generation_mode="image", generation_config=settings)
        model.decode_image_tokens(codes)


# ------------------------------------------------------------------------------------ Emu3
def emu3(size: str, directory: Path, device: str, dtype: torch.dtype, grid: tuple[int, int] | None):
    from opsd_emu3 import flavours
    from opsd_emu3.backend import Emu3Backend
    from opsd_emu3.config import Emu3Params
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    if size == "debug":
        params = Emu3Params(flavour="debug", vt_grid=grid or (3, 4), image_min_pixels=256, image_max_pixels=1024)
        backend = Emu3Backend(params).place(device, dtype)
        return backend, backend.build_model().eval()
    tokenizer = flavours.debug_tokenizer(EMU3_CODEBOOK)
    tokenizer.save_pretrained(str(directory))
    vocabulary = dict(tokenizer.get_vocab())
    config = Emu3Config(
        vocabulary_map={**vocabulary, "<image>": vocabulary[flavours.PLACEHOLDER]},
        text_config=dict(
            pad_token_id=vocabulary[flavours.PAD], bos_token_id=vocabulary[flavours.BOS],
            eos_token_id=vocabulary[flavours.EOS], attention_dropout=0.0,
        ),
        vq_config=dict(codebook_size=EMU3_CODEBOOK),
    )
    config.save_pretrained(str(directory))
    (directory / "model.safetensors").touch()
    low, high = EMU3_IMAGE_PIXELS
    settings = dict(vt_grid=grid) if grid else {}
    params = Emu3Params(checkpoint=str(directory), checkpoint_kind="gen", image_min_pixels=low, image_max_pixels=high, **settings)
    backend = Emu3Backend(params).place(device, dtype)
    return backend, random_model(Emu3ForConditionalGeneration, backend.config, device, dtype)


def emu3_prompts(backend, count: int) -> list[list[int]]:
    header = backend.image_header(*backend.params.vt_grid)
    texts = [f"a diagram of the path through maze {i}, drawn in thin blue lines" for i in range(count)]
    return [[backend.ids["bos"], *backend.encode(text), *header] for text in texts]


def emu3_ours(backend, model, prompts: list[list[int]], seed: int) -> None:
    from opsd_emu3 import visual_thought

    negative = visual_thought.negative_prompt(backend)
    codes = visual_thought.draw_codes(backend, model, prompts, negative, torch.Generator().manual_seed(seed))
    visual_thought.decode_codes(backend, model, codes)


def emu3_generate(backend, model, prompts: list[list[int]], seed: int) -> None:
    from opsd_emu3 import visual_thought
    from transformers import GenerationConfig

    ids, params = backend.ids, backend.params
    rows, columns = params.vt_grid
    input_ids, attention = left_padded(prompts, ids["pad"], model.device)
    visual = backend.code_to_token.tolist()
    end_of_line = [ids["end_of_line"]]

    def allowed(batch_id: int, sequence: torch.Tensor) -> list[int]:
        header_end = int(torch.nonzero(sequence == ids["image_wrapper"])[-1])
        return end_of_line if (sequence.shape[0] - header_end) % (columns + 1) == 0 else visual

    count = rows * (columns + 1)
    sampled = params.vt_temperature > 0
    settings = GenerationConfig(
        do_sample=sampled, temperature=params.vt_temperature if sampled else None, top_k=params.vt_top_k, top_p=None,
        max_new_tokens=count, min_new_tokens=count, guidance_scale=params.vt_guidance_scale,
        bos_token_id=ids["bos"], pad_token_id=ids["pad"], eos_token_id=ids["eos"],
    )
    guidance = {}
    if params.vt_guidance_scale > 1:
        negative = visual_thought.negative_prompt(backend)
        guidance = {
            "negative_prompt_ids": torch.tensor([negative] * len(prompts), device=model.device),
            "negative_prompt_attention_mask": torch.ones(len(prompts), len(negative), dtype=torch.long, device=model.device),
        }
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=attention, generation_config=settings, prefix_allowed_tokens_fn=allowed, **guidance)
        tokens = output[:, input_ids.shape[1] :]
        closing = torch.tensor([[ids["end_of_frame"], ids["image_end"], ids["eos"]]] * len(prompts), device=tokens.device)
        model.decode_image_tokens(image_tokens=torch.cat([tokens, closing], dim=1), height=rows, width=columns)


# ------------------------------------------------------------------------------------ shared
def left_padded(prompts: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (B, T) ids and their attention mask, each prompt padded on the left."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def problems(count: int, side: int) -> list[Problem]:
    return [Problem(f"vt{i}", picture(side, i), f"Question {i}: which path leads from the start to the goal?") for i in range(count)]


def drawing(name, backend, model, results: dict, batches: Sequence[int], image_tokens: int, side: int,
            prompts, ours, generate, skip_generate: bool) -> None:
    """Seconds per image and per generated token, ours beside transformers' generate, per batch size."""
    ours(backend, model, prompts(backend, 1), 0)  # warm-up
    for batch in batches:
        entry = {"image_tokens": image_tokens}
        chosen = prompts(backend, batch)
        ours_s = seconds(lambda: ours(backend, model, chosen, 1))
        entry["ours_seconds_per_image"] = ours_s / batch
        entry["ours_ms_per_token"] = 1000 * ours_s / (batch * image_tokens)
        if not skip_generate:
            try:
                if batch == batches[0]:
                    generate(backend, model, prompts(backend, 1), 0)  # warm-up
                theirs = seconds(lambda: generate(backend, model, chosen, 1))
            except Exception as error:  # the installed transformers' own generation can fail
                entry["transformers_error"] = f"{type(error).__name__}: {error}"
                skip_generate = True
            else:
                entry["transformers_seconds_per_image"] = theirs / batch
                entry["transformers_ms_per_token"] = 1000 * theirs / (batch * image_tokens)
                entry["speedup"] = theirs / ours_s
        with_problem = problems(batch, side)
        full = seconds(lambda: backend.generate_visual_thought(model, with_problem, torch.Generator().manual_seed(2)))
        entry["ours_from_problem_seconds_per_image"] = full / batch
        results[f"{name}_draw_batch_{batch}"] = entry
        print(json.dumps({f"{name}_draw_batch_{batch}": entry}), flush=True)


@torch.no_grad()
def decoding(name, backend, model, results: dict, batches: Sequence[int], tokens: int, side: int) -> None:
    """Tokens/s of the on-policy sampler (prefill included) and of decode steps alone."""
    builder = backend.context_builder()
    for batch in batches:
        contexts = [builder.student_context(problem) for problem in problems(batch, side)]
        seeds = list(range(batch))
        sampler = BatchedSampler(backend, 1.0, tokens, max_image_skips=0, sync_every=tokens)
        sampler.sample(model, contexts[:1], seeds=seeds[:1])  # warm-up
        sampled = []
        total = seconds(lambda: sampled.append(sampler.sample(model, contexts, seeds=seeds)))
        produced = int(sampled[0].lengths.sum())
        feed = torch.full((batch,), backend.vocabulary.eos_id - 1, dtype=torch.long, device=backend.device)
        state = [None]
        prefill = seconds(lambda: state.__setitem__(0, backend.start_decoding(model, contexts, tokens)))

        def steps():
            for _ in range(tokens - 1):
                backend.decode_step(state[0], feed)

        stepped = seconds(steps)
        entry = {
            "context_tokens": backend.context_length(contexts[0]),
            "sampler_tokens": produced,
            "sampler_tokens_per_s": produced / total,
            "prefill_seconds": prefill,
            "decode_steps": tokens - 1,
            "steps_tokens_per_s": batch * (tokens - 1) / stepped,
            "ms_per_step": 1000 * stepped / (tokens - 1),
        }
        results[f"{name}_decode_batch_{batch}"] = entry
        print(json.dumps({f"{name}_decode_batch_{batch}": entry}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--size", choices=["real", "debug"], default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", choices=["janus", "emu3"], default=["janus", "emu3"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="drawing batch sizes")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16], help="decoding batch sizes")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--emu3-grid", type=int, nargs=2, metavar=("ROWS", "COLUMNS"), help="Emu3's VT grid (default: the backend's)")
    parser.add_argument("--skip-generate", action="store_true", help="skip transformers' generate")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --size debug --device cpu)")
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "size": args.size}
    import transformers

    results["transformers"] = transformers.__version__
    print(json.dumps(results), flush=True)
    grid = tuple(args.emu3_grid) if args.emu3_grid else None
    for name in args.models:
        with tempfile.TemporaryDirectory() as directory:
            started = time.perf_counter()
            if name == "janus":
                backend, model = janus(args.size, Path(directory), args.device, dtype)
                image_tokens, side = backend.image_tokens, backend.params.image_size
                prompts, ours, generate = janus_prompts, janus_ours, janus_generate
            else:
                backend, model = emu3(args.size, Path(directory), args.device, dtype, grid)
                rows, columns = backend.params.vt_grid
                image_tokens, side = rows * (columns + 1), rows * backend.spatial_factor
                prompts, ours, generate = emu3_prompts, emu3_ours, emu3_generate
            synchronize()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            results[f"{name}_model"] = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "build_seconds": time.perf_counter() - started,
                "vt_image": f"{side}x{side}" if name == "janus" else f"{rows}x{columns} tokens",
                "generated_tokens_per_image": image_tokens,
            }
            print(json.dumps({f"{name}_model": results[f"{name}_model"]}), flush=True)
            drawing(name, backend, model, results, args.batches, image_tokens, side, prompts, ours, generate, args.skip_generate)
            decoding(name, backend, model, results, args.decode_batches, args.decode_tokens, side)
            if cuda:
                results[f"{name}_model"]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            del backend, model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
