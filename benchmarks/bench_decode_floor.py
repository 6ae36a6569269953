"""Batch-1 decoding of the full-size ThinkMorph LLM against its memory-bandwidth floor.

A batch-1 decode step must read every weight it multiplies by once: the understanding
expert's 28 decoder layers, the final norm and the lm_head (the embedding table is not read,
only one row of it; the generation expert is idle). This script measures, on one GPU:

* the bandwidth the GPU reaches reading memory (a 4 GiB read-only reduction, and a copy);
* the floor: the bytes a step reads divided by the best read bandwidth measured;
* each family of weight passes alone (28 layers' q / k / v, o, gate / up with SwiGLU, down,
  and the lm_head), replayed from a CUDA graph, as the layer runs them (library matrix
  products) and as the one-row kernels of ``opsd_core.kernels.gemv`` run them: time and
  achieved bandwidth;
* the whole decode step as the sampler runs it, with the kernels (``decode_kernels``, the
  default) and with the layer as written, side by side in alternating rounds, and each one's
  ratio to the floor; ``--profile`` prints the GPU kernels inside decode steps, ``--sweep``
  times every launch setting of the kernels on these shapes.

The floor's bandwidth is the best read bandwidth any kernel reached in the same run (the
reduction or a weight pass); the ratio to the datasheet's bandwidth is printed as well.

    python benchmarks/bench_decode_floor.py [--profile] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import bench_thinkmorph_gpu  # the sibling script (this directory is on sys.path when run)
import torch
import torch.nn.functional as F
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams

from opsd_core.kernels import gemv


def graph_ms(fn, replays: int = 20) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measured_bandwidth() -> dict:
    """Bytes per second of a 4 GiB read-only reduction and of a 2 GiB -> 2 GiB copy."""
    source = torch.ones(2**31, dtype=torch.bfloat16, device="cuda")  # 4 GiB
    total = torch.empty((), dtype=torch.float32, device="cuda")
    read_ms = graph_ms(lambda: torch.sum(source, dim=0, dtype=torch.float32, out=total), replays=10)
    half = source[: 2**30]
    target = torch.empty_like(half)
    copy_ms = graph_ms(lambda: target.copy_(half), replays=10)
    return {"read_tb_s": 2**32 / read_ms / 1e9, "copy_tb_s": 2 * 2**31 / copy_ms / 1e9}


@torch.no_grad()
def matmul_families(model) -> dict:
    """Each family of a batch-1 decode step's weight passes over the 28 layers, alone, from one
    CUDA graph: as the layer runs them (one library product per projection, then the SwiGLU
    and residual ops) and as :mod:`opsd_core.kernels.gemv` runs them."""
    llm = model.language_model
    layers = llm.model.layers
    config = model.config.llm
    x = torch.randn(config.hidden_size, dtype=torch.bfloat16, device="cuda")
    wide = torch.randn(config.intermediate_size, dtype=torch.bfloat16, device="cuda")

    def projections(layer):
        attn = layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def library_qkv(layer):
        return torch.cat([F.linear(x, p.weight, p.bias) for p in projections(layer)])

    def kernel_qkv(layer):
        return gemv.linear(x, [p.weight for p in projections(layer)], [p.bias for p in projections(layer)])

    families = {  # name: (library call, kernel call, weights read) per layer
        "q_k_v": (library_qkv, kernel_qkv, lambda layer: [p.weight for p in projections(layer)]),
        "o_residual": (
            lambda layer: x + F.linear(x, layer.self_attn.o_proj.weight),
            lambda layer: gemv.linear(x, [layer.self_attn.o_proj.weight], residual=x),
            lambda layer: [layer.self_attn.o_proj.weight],
        ),
        "gate_up_swiglu": (
            lambda layer: F.silu(F.linear(x, layer.mlp.gate_proj.weight)) * F.linear(x, layer.mlp.up_proj.weight),
            lambda layer: gemv.swiglu(x, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight),
            lambda layer: [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight],
        ),
        "down_residual": (
            lambda layer: x + F.linear(wide, layer.mlp.down_proj.weight),
            lambda layer: gemv.linear(wide, [layer.mlp.down_proj.weight], residual=x),
            lambda layer: [layer.mlp.down_proj.weight],
        ),
    }
    results = {}
    for name, (library, kernel, weights) in families.items():
        nbytes = sum(w.nbytes for layer in layers for w in weights(layer))
        library_ms = graph_ms(lambda library=library: [library(layer) for layer in layers])
        kernel_ms = graph_ms(lambda kernel=kernel: [kernel(layer) for layer in layers])
        results[name] = _family(nbytes, library_ms, kernel_ms)
    head = llm.lm_head.weight
    results["lm_head"] = _family(
        head.nbytes, graph_ms(lambda: F.linear(x, head)), graph_ms(lambda: gemv.linear(x, [head]))
    )
    results["all"] = _family(
        sum(r["gb"] for r in results.values()) * 1e9,
        sum(r["library_ms"] for r in results.values()),
        sum(r["kernels_ms"] for r in results.values()),
    )
    return results


def _family(nbytes: float, library_ms: float, kernel_ms: float) -> dict:
    return {
        "gb": nbytes / 1e9,
        "library_ms": library_ms,
        "library_tb_s": nbytes / library_ms / 1e9,
        "kernels_ms": kernel_ms,
        "kernels_tb_s": nbytes / kernel_ms / 1e9,
        "speedup": library_ms / kernel_ms,
    }


@torch.no_grad()
def sweep_block_configs(model) -> dict:
    """Time every launch setting of the one-row kernels on the 7B shapes (28 layers each, from a
    CUDA graph) and return the fastest per family; ``block_config`` in
    ``opsd_core/kernels/_gemv_triton.py`` holds the H200's."""
    from opsd_core.kernels import _gemv_triton

    llm = model.language_model
    layers = llm.model.layers
    x = torch.randn(model.config.llm.hidden_size, dtype=torch.bfloat16, device="cuda")
    wide = torch.randn(model.config.llm.intermediate_size, dtype=torch.bfloat16, device="cuda")

    def qkv(layer, config):
        attn = layer.self_attn
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        return _gemv_triton.linear(x, [p.weight for p in projections], [p.bias for p in projections], None, config)

    families = {
        "q_k_v": lambda config: [qkv(layer, config) for layer in layers],
        "o_residual": lambda config: [
            _gemv_triton.linear(x, [layer.self_attn.o_proj.weight], None, x, config) for layer in layers
        ],
        "gate_up_swiglu": lambda config: [
            _gemv_triton.swiglu(x, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, config) for layer in layers
        ],
        "down_residual": lambda config: [
            _gemv_triton.linear(wide, [layer.mlp.down_proj.weight], None, x, config) for layer in layers
        ],
        "lm_head": lambda config: [_gemv_triton.linear(x, [llm.lm_head.weight], None, None, config)],
    }
    best = {}
    for name, run in families.items():
        timings = []
        for rows, width, warps, stages in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 3)):
            config = {"BLOCK_N": rows, "BLOCK_K": width, "num_warps": warps, "num_stages": stages}
            timings.append((graph_ms(lambda run=run, config=config: run(config)), config))
        timings.sort(key=lambda timing: timing[0])
        best[name] = {"ms": timings[0][0], "config": timings[0][1], "slowest_ms": timings[-1][0]}
        print(json.dumps({name: best[name]}), flush=True)
    return best


def decode_bytes(model, cache_positions: int) -> int:
    """Bytes one batch-1 decode step reads: the understanding expert's layers, final norm, lm_head,
    and the keys and values of ``cache_positions`` cached positions."""
    llm = model.language_model
    total = llm.lm_head.weight.nbytes + llm.model.norm.weight.nbytes
    for layer in llm.model.layers:
        for name, tensor in layer.named_parameters():
            if "moe_gen" not in name:
                total += tensor.nbytes
    config = model.config.llm
    total += 2 * config.num_layers * config.num_kv_heads * config.head_dim * cache_positions * 2
    return total


@torch.no_grad()
def decode_step_ms(backend, model, steps: int, profile: bool) -> dict:
    """Milliseconds per batch-1 decode step and the cache's slots, timed as
    ``bench_thinkmorph_gpu.py`` times decoding (its 448x448 problem image, room for ``steps`` + 16
    tokens)."""
    bench_thinkmorph_gpu.PROFILE = profile
    results: dict = {}
    bench_thinkmorph_gpu.decoding(backend, model, results, batch=1, steps=steps, image_side=448)
    step = results["decode_batch_1"]
    return {"ms_per_step": step["ms_per_step"], "capacity": step["context_tokens"] + steps + 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--profile", action="store_true", help="print the GPU kernels of four decode steps")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="side-by-side rounds of the two decode steps")
    parser.add_argument("--sweep", action="store_true", help="also time every launch setting of the kernels")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["bandwidth"] = measured_bandwidth()
    print(json.dumps(results), flush=True)
    params = ThinkMorphParams(flavour="7b-random")
    ours = ThinkMorphBackend(params).place("cuda", torch.bfloat16)
    layer = ThinkMorphBackend(params.model_copy(update={"decode_kernels": False})).place("cuda", torch.bfloat16)
    model = ours.build_model()
    results["weight_passes"] = matmul_families(model)
    print(json.dumps(results["weight_passes"]), flush=True)
    if args.sweep:
        results["sweep"] = sweep_block_configs(model)
    steps: dict = {"kernels": [], "layer": []}
    for _ in range(args.rounds):
        steps["layer"].append(decode_step_ms(layer, model, args.steps, profile=False))
        steps["kernels"].append(decode_step_ms(ours, model, args.steps, profile=args.profile))
        print(json.dumps({name: runs[-1] for name, runs in steps.items()}), flush=True)
    capacity = steps["kernels"][0]["capacity"]
    nbytes = decode_bytes(model, capacity)
    best_read = max(
        results["bandwidth"]["read_tb_s"], *(family["kernels_tb_s"] for family in results["weight_passes"].values())
    )
    floor_ms = nbytes / best_read / 1e9
    spec_floor_ms = nbytes / SPEC_TB_S.get(results["device"], float("nan")) / 1e9
    summary = {"step_gb": nbytes / 1e9, "floor_ms": floor_ms, "best_read_tb_s": best_read, "spec_floor_ms": spec_floor_ms}
    for name, runs in steps.items():
        ms = statistics.median(run["ms_per_step"] for run in runs)
        summary[name] = {"ms_per_step": ms, "tokens_per_s": 1000 / ms, "x_floor": ms / floor_ms, "x_spec_floor": ms / spec_floor_ms}
    summary["speedup"] = summary["layer"]["ms_per_step"] / summary["kernels"]["ms_per_step"]
    results["decode_batch_1"] = summary
    print(json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


# Datasheet memory bandwidth, TB/s.
SPEC_TB_S = {"NVIDIA H200": 4.8, "NVIDIA H100 80GB HBM3": 3.35, "NVIDIA H100 PCIe": 2.0, "NVIDIA A100-SXM4-80GB": 2.04}


if __name__ == "__main__":
    main()
