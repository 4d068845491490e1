"""`alignloop bench scorer`: the reward scorer's backends side by side, in one run, as one JSON object.

CPU (always): torch eager vs onnxruntime, for the head alone at Lee et al.'s sizes (768 -> 1024 -> 1024)
and for the whole scorer with the bundled tiny CLIP (with a head, and with the CLIP score), at batch
16/64/256, fp32. The whole-scorer figures decide the CPU backend and are recorded for dispatch.

CUDA (when a GPU is present): the head at Lee et al.'s sizes in fp16 at batch 16/64/256: the fused
Triton kernel vs torch eager vs torch.compile (mode="reduce-overhead", i.e. CUDA graphs), and the
kernel against its floor = weight bytes / measured copy bandwidth + one measured empty launch.
"""

import copy
import datetime
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from alignloop.kernels.config import HeadConfig, ScorerConfig
from alignloop.kernels.dispatch import CPU_CHOICE_SCHEMA
from alignloop.machine import describe_machine
from alignloop.rewards.head import RewardHead

LEE = HeadConfig(embed_dim=768, hidden=(1024, 1024))  # ViT-L-14 embeddings, two hidden layers of 1024
ONNX_MARGIN = 1.05  # onnxruntime must be >= 5% faster to be chosen: it costs an export at start-up


# -------------------------------------------------------------------------------------------------
# Machine and timing
# -------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    import onnxruntime
    import triton

    return {**describe_machine(), "triton": triton.__version__, "onnxruntime": onnxruntime.__version__}


def cuda_time(fn: Callable, iters: int = 200, repeats: int = 5) -> float:
    """Seconds per call of back-to-back calls (launch overhead included, as on the serving path);
    median of `repeats` runs of `iters` calls timed with CUDA events."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(runs)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


# -------------------------------------------------------------------------------------------------
# CPU: torch eager vs onnxruntime
# -------------------------------------------------------------------------------------------------

def _compare(torch_fn, ort_fn, reps) -> dict:
    """Times the two alternately, call by call, so that a background load (this box shares its cores)
    falls on both alike; medians of `reps` calls each, after a warm-up."""
    with torch.inference_mode():
        reference = torch_fn()
        diff = (ort_fn() - reference.float()).abs().max().item()
        for _ in range(2):
            torch_fn(), ort_fn()
        t_torch, t_ort = [], []
        for _ in range(reps):
            for fn, times in ((torch_fn, t_torch), (ort_fn, t_ort)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    t_torch, t_ort = statistics.median(t_torch), statistics.median(t_ort)
    return {"torch_ms": _ms(t_torch), "onnxruntime_ms": _ms(t_ort),
            "torch_over_onnxruntime": round(t_torch / t_ort, 3), "max_abs_diff": diff}


def bench_cpu(batches, quick: bool, threads: int) -> dict:
    from alignloop.kernels.onnx_scorer import OrtSession, ScorerGraph, export_head_onnx, export_scorer_onnx
    from alignloop.models import load_clip

    reps = 5 if quick else 20
    gen = torch.Generator().manual_seed(0)
    results = {"reps": reps}

    # 1. Head alone, Lee et al.'s sizes
    head = RewardHead(LEE.embed_dim, LEE.hidden).eval()
    head_ort = OrtSession(export_head_onnx(head), threads=threads, use_cuda=False)
    results["head"] = {"config": {"embed_dim": LEE.embed_dim, "hidden": list(LEE.hidden)}, "providers": head_ort.providers}
    text = torch.randn(1, LEE.embed_dim, generator=gen)
    for batch in batches:
        image = torch.randn(batch, LEE.embed_dim, generator=gen)
        results["head"][str(batch)] = _compare(lambda: head(image, text),
                                               lambda: head_ort(image_embedding=image, text_embedding=text), reps)

    # 2. Whole scorer with the bundled tiny CLIP: pixels -> rewards (the text embedding is cached per prompt)
    clip = load_clip(device="cpu", dtype=torch.float32)
    normalize = [t for t in clip.preprocess.transforms if type(t).__name__ == "Normalize"][0]
    for name, scorer_head in (("scorer_head", RewardHead(clip.embed_dim).eval()), ("scorer_clip_score", None)):
        graph = ScorerGraph(clip.model, normalize.mean, normalize.std, scorer_head).eval()
        ort = OrtSession(export_scorer_onnx(clip.model, normalize.mean, normalize.std, clip.image_size,
                                            clip.embed_dim, scorer_head), threads=threads, use_cuda=False)
        text = clip.encode_texts(["three red circles on a gray background"])
        results[name] = {"clip": clip.name, "image_size": clip.image_size, "embed_dim": clip.embed_dim,
                         "head_hidden": list(scorer_head.hidden) if scorer_head else None, "providers": ort.providers}
        for batch in batches:
            pixels = torch.rand(batch, 3, clip.image_size, clip.image_size, generator=gen)
            results[name][str(batch)] = _compare(lambda: graph(pixels, text),
                                                 lambda: ort(pixels=pixels, text_embedding=text), reps)
    return results


def cpu_choice(cpu: dict, batches) -> dict:
    """onnxruntime if its whole-scorer speed-up, geometric mean over both variants and all batches, clears
    ONNX_MARGIN; else torch."""
    ratios = [cpu[name][str(b)]["torch_over_onnxruntime"] for name in ("scorer_head", "scorer_clip_score") for b in batches]
    speedup = _geomean(ratios)
    return {"schema": CPU_CHOICE_SCHEMA, "backend": "onnxruntime" if speedup >= ONNX_MARGIN else "torch",
            "basis": f"whole scorer, torch/onnxruntime time geomean {speedup:.3f} over batches "
                     f"{list(batches)} (onnxruntime needs >= {ONNX_MARGIN})",
            "torch_over_onnxruntime_geomean": round(speedup, 4)}


# -------------------------------------------------------------------------------------------------
# CUDA: fused Triton vs torch eager vs torch.compile (CUDA graphs), and the floor
# -------------------------------------------------------------------------------------------------

def _floor_parts() -> dict:
    """Achievable bandwidth (a large device-to-device copy) and the time of one empty Triton launch."""
    from alignloop.kernels.triton_head import empty_kernel

    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = cuda_time(lambda: dst.copy_(src), iters=10)
    flag = torch.empty(1, device="cuda")
    launch_s = cuda_time(lambda: empty_kernel[(1,)](flag), iters=500)
    del src, dst
    return {"bandwidth_gb_s": round(2 * nbytes / copy_s / 1e9, 1), "launch_us": round(launch_s * 1e6, 2)}


def bench_cuda(batches, quick: bool) -> dict:
    from alignloop.kernels.triton_head import fused_reward_head

    dtype = torch.float16
    head = RewardHead(LEE.embed_dim, LEE.hidden).to("cuda", dtype).eval()
    compiled = torch.compile(head, mode="reduce-overhead", fullgraph=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in head.parameters())
    parts = _floor_parts()
    floor_s = weight_bytes / (parts["bandwidth_gb_s"] * 1e9) + parts["launch_us"] * 1e-6
    results = {"dtype": "float16", "config": {"embed_dim": LEE.embed_dim, "hidden": list(LEE.hidden)},
               "weight_bytes": weight_bytes, **parts, "floor_us": round(floor_s * 1e6, 2)}
    ref_head = copy.deepcopy(head).float()  # fp32 reference on the same (fp16-rounded) weights
    gen = torch.Generator(device="cuda").manual_seed(0)
    iters = 50 if quick else 200
    for batch in batches:
        image = torch.randn(batch, LEE.embed_dim, device="cuda", dtype=dtype, generator=gen)
        text = torch.randn(1, LEE.embed_dim, device="cuda", dtype=dtype, generator=gen)

        def run_compiled():
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(image, text)

        with torch.inference_mode():
            reference = ref_head(image.float(), text.float())
            fused_out = fused_reward_head(image, text, head)
            t_fused = cuda_time(lambda: fused_reward_head(image, text, head), iters)
            t_eager = cuda_time(lambda: head(image, text), iters)
            t_compiled = cuda_time(run_compiled, iters)
        results[str(batch)] = {
            "fused_us": round(t_fused * 1e6, 2), "eager_us": round(t_eager * 1e6, 2),
            "compiled_us": round(t_compiled * 1e6, 2),
            "eager_over_fused": round(t_eager / t_fused, 3), "compiled_over_fused": round(t_compiled / t_fused, 3),
            "fused_over_floor": round(t_fused / floor_s, 3),
            "max_abs_diff_vs_fp32_reference": (fused_out - reference).abs().max().item(),
        }
    if "64" in results:
        r = results["64"]
        results["goals_batch_64"] = {"fused_>=5x_eager": r["eager_over_fused"] >= 5,
                                     "fused_not_slower_than_compile": r["compiled_over_fused"] >= 1,
                                     "fused_within_3x_floor": r["fused_over_floor"] <= 3}
    return results


# -------------------------------------------------------------------------------------------------
# Entry point
# -------------------------------------------------------------------------------------------------

def run(quick: bool = False, batches=(16, 64, 256), record_path: Optional[Path] = None) -> dict:
    threads = ScorerConfig().ort_threads or torch.get_num_threads()
    started = time.perf_counter()
    report = {"bench": "scorer", "quick": quick,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(),
              "settings": {"batches": list(batches), "cpu_dtype": "float32", "threads": threads,
                           "timing": "median wall time per call, torch and onnxruntime interleaved (CPU); CUDA events over back-to-back calls (GPU)"}}
    torch.manual_seed(0)
    report["cpu"] = bench_cpu(batches, quick, threads)
    choice = cpu_choice(report["cpu"], batches)
    choice["machine"] = {k: report["machine"][k] for k in ("cpu", "cpu_count", "torch_threads", "load_average_1m")}
    choice["date"] = report["date"]
    if record_path is not None:
        Path(record_path).write_text(json.dumps(choice, indent=2) + "\n")
    report["cpu_choice"] = {**choice, "written_to": str(record_path) if record_path else None}

    if torch.cuda.is_available():
        report["gpu"] = bench_cuda(batches, quick)
        report["ratio"] = report["gpu"].get("64", report["gpu"][str(batches[0])])["eager_over_fused"]
        report["ratio_means"] = "GPU head, fp16, batch 64: torch eager time / fused Triton time (bigger: fused faster)"
    else:
        report["gpu"] = {"skipped": "no CUDA device (torch.cuda.is_available() is False): fused Triton vs "
                                    "eager vs torch.compile and the floor were not measured on this machine"}
        key = "64" if "64" in report["cpu"]["scorer_head"] else str(batches[0])
        report["ratio"] = report["cpu"]["scorer_head"][key]["torch_over_onnxruntime"]
        report["ratio_means"] = (f"CPU whole scorer with head, batch {key}: torch eager time / onnxruntime time "
                                 "(bigger: onnxruntime faster)")
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def summary_lines(report: dict) -> list:
    lines = [f"machine: {report['machine']['cpu']} x{report['machine']['cpu_count']}, "
             f"load {report['machine']['load_average_1m']}, torch threads {report['settings']['threads']}"]
    for name in ("head", "scorer_head", "scorer_clip_score"):
        for batch in report["settings"]["batches"]:
            r = report["cpu"][name][str(batch)]
            lines.append(f"cpu {name:18s} B={batch:<4d} torch {r['torch_ms']:9.3f} ms  onnxruntime "
                         f"{r['onnxruntime_ms']:9.3f} ms  ratio {r['torch_over_onnxruntime']:.2f}")
    lines.append(f"cpu choice: {report['cpu_choice']['backend']} ({report['cpu_choice']['basis']})")
    gpu = report["gpu"]
    if "skipped" in gpu:
        lines.append(f"gpu: {gpu['skipped']}")
    else:
        for batch in report["settings"]["batches"]:
            r = gpu[str(batch)]
            lines.append(f"gpu head fp16 B={batch:<4d} fused {r['fused_us']:8.2f} us  eager {r['eager_us']:8.2f} us  "
                         f"compile {r['compiled_us']:8.2f} us  floor {gpu['floor_us']:.2f} us")
    return lines
