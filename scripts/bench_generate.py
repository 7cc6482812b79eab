"""Generation speed and memory, per attention kind, cached vs uncached, and vs HF GPT-2.

    python scripts/bench_generate.py                      # full run (~30 min on 2 CPU cores)
    python scripts/bench_generate.py --quick --json out.json
    python scripts/bench_generate.py --goals --threads 1 --clock cpu   # the goal ratios only

Every job runs in a fresh process, one at a time. Per-kind rows: one implementation per
process, so its peak memory is that process's peak RSS above its level before building the
model (CUDA: peak allocated). The HF comparison times ours (eager and compiled decode step) and
``GPT2LMHeadModel.generate(use_cache=True)`` interleaved in one process, so a change in machine
load hits all alike; their peaks come from separate one-implementation runs. Times are the
best of ``--repeats`` greedy runs of exactly ``--new-tokens`` tokens (no EOS). ``tok/s`` = new
tokens / total time (prefill included); ``ms/tok`` = decode time per token ((total - time of a
1-token run) / (new - 1)); ``step ms`` = our decode step alone (prefill untimed, then ``new``
greedy ``model.step`` calls; best of the repeats), which shows O(1) vs O(T) steps without the
prefill's noise. ``transformers`` is optional:
without it the HF rows are skipped with a message.

The HF comparison also runs beam search (``num_beams=4`` against ``generate(num_beams=4)``, no
EOS, so every beam runs the full length), our compiled decode step, and our eager decode on the
fixed-shape path (whole KV buffer under a mask, what a compiled step runs) to price reading
the whole buffer against slicing it. ``--clock cpu`` times process CPU time, which resists load
from other processes (use it with ``--threads 1``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_runner(job: dict[str, Any], variant: dict[str, Any], prompt: Any) -> tuple[Any, Any]:
    """(run(n_new_tokens), cache bytes or None) for one implementation at the job's size."""
    import torch

    torch.manual_seed(0)
    if variant["impl"] == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=job["vocab"], n_embd=job["dim"], n_layer=job["layers"],
            n_head=job["heads"], n_positions=prompt.shape[1] + job["new"],
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
        hf = GPT2LMHeadModel(cfg).to(prompt.device).eval()

        def run_hf(n: int, ids: Any = prompt) -> None:
            with torch.inference_mode():
                hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                    min_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None,
                    pad_token_id=0, num_beams=variant.get("num_beams", 1), early_stopping=True,
                )  # fmt: skip

        return run_hf, None
    from minillm.attention import fixed_shape_decoding
    from minillm.generation import generate_ids, step_function
    from minillm.models import build_model

    model = build_model(
        dict(
            vocab_size=job["vocab"], dim=job["dim"], n_layers=job["layers"],
            n_heads=job["heads"], max_len=prompt.shape[1] + job["new"],
            attn={"kind": variant["kind"]},
        )
    ).to(prompt.device).eval()  # fmt: skip
    opts = dict(temperature=0, use_cache=variant["use_cache"], compile=variant["compile"])
    opts["num_beams"] = variant.get("num_beams", 1)
    path = fixed_shape_decoding if variant.get("fixed") else contextlib.nullcontext

    def run(n: int, ids: Any = prompt) -> None:
        with path():
            generate_ids(model, ids.tolist(), max_new_tokens=n, **opts)

    def decode(n: int, clock: Any) -> float:
        """Clock time of n greedy steps after an untimed prefill: the decode cost alone."""
        step = step_function(model, variant["compile"])
        with torch.inference_mode(), path():
            logits, state = model.start(prompt, max_new_tokens=n, use_cache=variant["use_cache"])
            token = logits.argmax(-1, keepdim=True)  # (1, 1)
            start = clock()
            for _ in range(n):
                token = step(token, state)[:, -1].argmax(-1, keepdim=True)
            if prompt.device.type == "cuda":
                torch.cuda.synchronize()
            return clock() - start

    run.decode = None if opts["num_beams"] > 1 else decode
    caches = model.init_caches(1, prompt.shape[1] + job["new"])
    return run, sum(c.nbytes for block in caches for c in block if c is not None)


def worker(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One job in this (fresh) process: build every variant, warm up, time them interleaved.

    Peak memory is reported only for a job of one variant: the process's peak RSS above its
    level once the model is built and has run a 4-token prompt (weights and imports excluded).
    """
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    torch.manual_seed(0)
    length = [v.get("prompt", job["prompt"]) for v in job["variants"]]  # a variant may override
    prompts = [torch.randint(4, job["vocab"], (1, t), device=device) for t in length]
    runners = [build_runner(job, v, p) for v, p in zip(job["variants"], prompts, strict=True)]
    for (run, _), prompt in zip(runners, prompts, strict=True):  # lazy imports, first calls
        run(1, prompt[:, :4])
    base = torch.cuda.memory_allocated() if device.type == "cuda" else rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    clock = time.process_time if job.get("clock") == "cpu" else time.perf_counter

    def timed(run: Any, n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        run(n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    n = job["new"]
    warm = [timed(run, min(n, 4)) if job["warmup"] else None for run, _ in runners]
    totals = [[] for _ in runners]
    firsts = [[] for _ in runners]
    decodes = [[] for _ in runners]
    for _ in range(job["repeats"]):  # interleaved, so load changes hit every variant alike
        for i, (run, _) in enumerate(runners):
            totals[i].append(timed(run, n))
            firsts[i].append(timed(run, 1))
            if getattr(run, "decode", None) is not None:
                decodes[i].append(run.decode(n, clock))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    results = []
    for i, variant in enumerate(job["variants"]):
        total, first, cache_bytes = min(totals[i]), min(firsts[i]), runners[i][1]
        results.append({
            **{k: v for k, v in job.items() if k != "variants"}, **variant,
            "total_s": total, "prefill_s": first, "tok_per_s": n / total,
            "ms_per_tok": 1e3 * max(total - first, 0.0) / max(n - 1, 1),
            "decode_ms": 1e3 * min(decodes[i]) / n if decodes[i] else None,
            "peak_mb": max(peak, 0) / 2**20 if len(runners) == 1 else None,
            "cache_mb": None if cache_bytes is None else cache_bytes / 2**20,
            "warmup_s": warm[i],
        })  # fmt: skip
    return results


def measure(job: dict[str, Any]) -> list[dict[str, Any]]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this tree's minillm
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *(p for p in sys.path if p)])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  failed: {job}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return []
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        label = f"{r['impl']}:{r.get('kind', 'gpt2')} {r['layers']}L/{r['dim']} T={r['prompt']}"
        flags = _flags(r)
        peak = "" if r["peak_mb"] is None else f", peak {r['peak_mb']:.1f} MB"
        print(
            f"  {label}{flags}: {r['tok_per_s']:.1f} tok/s, {r['ms_per_tok']:.2f} ms/tok, "
            f"step {fmt(r.get('decode_ms'), '.2f')} ms{peak}",
            file=sys.stderr,
            flush=True,
        )
    return results


def _flags(r: dict[str, Any]) -> str:
    flags = ("" if r["use_cache"] else " uncached") + (" compiled" if r["compile"] else "")
    flags += " fixed-shape" if r.get("fixed") else ""
    return flags + (f" beams={r['num_beams']}" if r.get("num_beams", 1) > 1 else "")


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from minillm.attention import ATTENTION

    kinds = args.kinds.split(",") if args.kinds else sorted(ATTENTION)
    lens = [int(x) for x in args.prompt_lens.split(",")]
    base = dict(
        vocab=args.vocab, new=args.new_tokens, repeats=args.repeats, device=args.device,
        threads=args.threads, warmup=True, clock=args.clock,
    )  # fmt: skip
    main = dict(base, layers=args.layers, dim=args.dim, heads=args.heads)
    eager = dict(impl="minillm", kind="mha", compile=False, use_cache=True)
    results: dict[str, Any] = {"kinds": [], "hf": [], "beams": [], "config": vars(args)}
    results["load_before"] = os.getloadavg()
    for kind in [] if args.goals else kinds:  # --goals: only the interleaved pairs below
        print(f"{kind} ({args.layers}L/{args.dim})", file=sys.stderr)
        for t in lens:
            variant = dict(eager, kind=kind)
            results["kinds"] += measure(dict(main, prompt=t, variants=[variant]))
            if t in args.uncached_lens:
                slow = dict(variant, use_cache=False)
                job = dict(main, prompt=t, variants=[slow], warmup=False, repeats=1)
                results["kinds"] += measure(job)
    for kind in [k for k in ("linear", "gated_linear") if k in kinds]:  # goal: interleaved
        print(f"{kind} short vs long context ({args.layers}L/{args.dim}), interleaved",
              file=sys.stderr)  # fmt: skip
        pair = [dict(eager, kind=kind, prompt=t) for t in (min(lens), max(lens))]
        results["contexts"] = results.get("contexts", []) + measure(
            dict(main, prompt=0, variants=pair)
        )
    for t in args.uncached_lens[:1]:  # the goal's ratio, timed interleaved
        print(f"mha cached vs uncached ({args.layers}L/{args.dim}), interleaved", file=sys.stderr)
        pair = [eager, dict(eager, use_cache=False)]
        results["pairs"] = measure(dict(main, prompt=t, variants=pair))
    if args.hf and not hf_available():
        print("transformers is not importable: skipping the HF reference", file=sys.stderr)
    elif args.hf:
        run_hf_comparison(args, base, eager, results)
    results["load_after"] = os.getloadavg()
    results["goals"] = goals(results, args)
    return results


def run_hf_comparison(
    args: argparse.Namespace, base: dict, eager: dict, results: dict[str, Any]
) -> None:
    """Greedy (eager, eager fixed-shape, compiled) and beam search against HF, interleaved."""
    hf = dict(impl="hf", compile=False, use_cache=True)
    variants = [eager, hf, dict(eager, fixed=True)]
    variants += [dict(eager, compile=True)] if args.compile else []
    for layers, dim, heads in ((4, 128, 4), (args.layers, args.dim, args.heads)):
        print(f"mha vs HF GPT-2 ({layers}L/{dim}), interleaved", file=sys.stderr)
        size = dict(base, layers=layers, dim=dim, heads=heads)
        for t in args.hf_lens:
            results["hf"] += measure(dict(size, prompt=t, variants=variants))
            if args.hf_memory:  # peaks need a process of their own
                for variant in (eager, hf):
                    job = dict(size, prompt=t, variants=[variant], repeats=1, warmup=False)
                    results["hf_memory"] = results.get("hf_memory", []) + measure(job)
        beams = [dict(v, num_beams=args.num_beams) for v in (eager, hf)]
        print(f"beam search ({args.num_beams}) vs HF ({layers}L/{dim})", file=sys.stderr)
        results["beams"] += measure(dict(size, prompt=args.hf_lens[0], variants=beams))


def _find(rows: list, **match: Any) -> dict | None:
    for row in rows:
        if row is not None and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def goals(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The issue's goal table, from the measurements (None where one was not measured)."""
    hf = results["hf"]
    lens = [int(x) for x in args.prompt_lens.split(",")]
    size = f"{args.layers}L/{args.dim}"
    out = []

    def ratio(a: dict | None, b: dict | None, key: str = "tok_per_s") -> float | None:
        return a[key] / b[key] if a and b and b[key] else None

    for t in args.uncached_lens[:1]:
        cached = _find(results.get("pairs", []), kind="mha", prompt=t, use_cache=True)
        uncached = _find(results.get("pairs", []), kind="mha", prompt=t, use_cache=False)
        name = f"mha cached vs uncached, {size}, {args.new_tokens} new (tok/s)"
        out.append(
            {"goal": name, "target": ">= 6x", "at": f"T={t}", "value": ratio(cached, uncached)}
        )
    greedy = dict(compile=False, fixed=None, num_beams=None)
    for layers, dim, target in ((4, 128, ">= 2x"), (args.layers, args.dim, ">= 1.2x")):
        for t in args.hf_lens:
            where = dict(layers=layers, dim=dim, prompt=t)
            ours = _find(hf, impl="minillm", **greedy, **where)
            comp = _find(hf, impl="minillm", compile=True, **where)
            ref = _find(hf, impl="hf", **where)
            name = f"mha greedy vs HF GPT-2 cached, {layers}L/{dim} (tok/s)"
            out.append({"goal": name, "target": target, "at": f"T={t}",
                        "value": ratio(ours, ref), "compiled": ratio(comp, ref)})  # fmt: skip
            fixed = _find(hf, impl="minillm", fixed=True, **where)
            name = f"mha eager fixed-shape vs sliced, {layers}L/{dim} (tok/s)"
            out.append({"goal": name, "target": "printed", "at": f"T={t}",
                        "value": ratio(fixed, ours)})  # fmt: skip
        where = dict(layers=layers, dim=dim, prompt=args.hf_lens[0])
        ours = _find(hf, impl="minillm", **greedy, **where)
        comp = _find(hf, impl="minillm", compile=True, **where)
        name = f"mha compiled vs eager greedy, {layers}L/{dim} (tok/s)"
        target = ">= 3x" if layers == 4 else "printed"
        out.append({"goal": name, "target": target, "at": where_t(where),
                    "value": ratio(comp, ours)})  # fmt: skip
        name = f"mha compiled vs eager decode step, {layers}L/{dim} (step ms)"
        out.append({"goal": name, "target": target, "at": where_t(where),
                    "value": ratio(ours, comp, "decode_ms")})  # fmt: skip
        beam = _find(results.get("beams", []), impl="minillm", **where)
        ref = _find(results.get("beams", []), impl="hf", **where)
        name = f"mha beam {args.num_beams} vs HF beam {args.num_beams}, {layers}L/{dim} (tok/s)"
        out.append({"goal": name, "target": ">= 1.2x", "at": where_t(where),
                    "value": ratio(beam, ref)})  # fmt: skip
    for kind in ("linear", "gated_linear"):  # timed interleaved in one process
        long = _find(results.get("contexts", []), kind=kind, prompt=max(lens))
        short = _find(results.get("contexts", []), kind=kind, prompt=min(lens))
        name = f"{kind} decode step ms, long vs short context"
        out.append({"goal": name, "target": "<= 1.1x", "at": f"T={max(lens)}/{min(lens)}",
                    "value": ratio(long, short, "decode_ms")})  # fmt: skip
    return out


def where_t(where: dict[str, Any]) -> str:
    return f"T={where['prompt']}"


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def print_tables(results: dict[str, Any]) -> None:
    print("\n| kind | prompt | cache | tok/s | ms/tok | step ms | prefill s | peak MB | cache MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results["kinds"]:
        cache = "yes" if r["use_cache"] else "no"
        print(
            f"| {r['kind']} | {r['prompt']} | {cache} | {fmt(r['tok_per_s'])} | "
            f"{fmt(r['ms_per_tok'], '.2f')} | {fmt(r.get('decode_ms'), '.2f')} | "
            f"{fmt(r['prefill_s'], '.3f')} | "
            f"{fmt(r['peak_mb'])} | {fmt(r['cache_mb'], '.2f')} |"
        )
    timed_together = results.get("pairs", []) + results["hf"] + results.get("beams", [])
    timed_together += results.get("contexts", [])
    if timed_together:
        print("\n(timed interleaved in one process per prompt length)")
        print("| model | prompt | impl | tok/s | ms/tok | step ms | prefill s | peak MB |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for r in timed_together:
            mem = _find(results.get("hf_memory", []), impl=r["impl"], compile=r["compile"],
                        use_cache=r["use_cache"], layers=r["layers"], dim=r["dim"],
                        prompt=r["prompt"])  # fmt: skip
            r = dict(r, peak_mb=mem["peak_mb"] if mem else None)
            impl = r["impl"] + ("" if r.get("kind", "mha") == "mha" else f":{r['kind']}")
            impl += _flags(r)
            print(
                f"| {r['layers']}L/{r['dim']} | {r['prompt']} | {impl} | {fmt(r['tok_per_s'])} | "
                f"{fmt(r['ms_per_tok'], '.2f')} | {fmt(r.get('decode_ms'), '.2f')} | "
                f"{fmt(r['prefill_s'], '.3f')} | "
                f"{fmt(r['peak_mb'])} |"
            )
    print("\n| goal | target | at | measured | compiled |")
    print("|---|---|---|---:|---:|")
    for g in results["goals"]:
        print(f"| {g['goal']} | {g['target']} | {g['at']} | {fmt(g['value'], '.2f')} | "
              f"{fmt(g.get('compiled'), '.2f')} |")  # fmt: skip
    print(f"\nload average before/after: {results['load_before']} / {results['load_after']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--kinds", default="", help="comma-separated registry keys (default: all)")
    p.add_argument("--prompt-lens", default="128,256,512,1024,2048,4096")
    p.add_argument("--uncached-lens", default="128", help="prompt lengths also run uncached")
    p.add_argument("--hf-lens", default="128,1024,4096", help="prompt lengths for mha vs HF")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF reference")
    p.add_argument("--no-hf-memory", dest="hf_memory", action="store_false",
                   help="skip the separate peak-memory runs of the HF comparison")  # fmt: skip
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the compiled-decode rows of the HF comparison")  # fmt: skip
    p.add_argument("--num-beams", type=int, default=4, help="beams in the HF beam comparison")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time (robust on a shared machine, with --threads 1)",
    )
    p.add_argument("--quick", action="store_true", help="prompts 128,512; 64 new tokens")
    p.add_argument(
        "--goals",
        action="store_true",
        help="only what the goal table needs: linear kinds at 128 and 4096, HF at 128",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))  # the parent reads the last line
        return
    if args.quick:
        args.prompt_lens, args.hf_lens, args.new_tokens = "128,512", "128,512", 64
        args.repeats = 1
    if args.goals:
        args.kinds, args.prompt_lens, args.hf_lens = "linear,gated_linear", "128,4096", "128"
        args.uncached_lens, args.hf_memory = "", False
    args.uncached_lens = [int(x) for x in str(args.uncached_lens).split(",") if x]
    args.hf_lens = [int(x) for x in str(args.hf_lens).split(",") if x]
    results = run_all(args)
    print_tables(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
