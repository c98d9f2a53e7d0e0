"""Benchmark `surgery convert` on a synthetic sharded checkpoint with Mixout targets.

Builds a llama-shaped model (bf16 by default, >= 2 GB on disk with its Mixout targets),
saves it surgered with ``save_pretrained`` (sharded), then, in the same run:

* ``cp -r`` of the checkpoint, and ``cp -r && sync`` (the copies flushed to disk, as convert
  fsyncs what it writes and reads it back; plain ``cp`` does neither), side by side,
* ``surgery convert SRC DST`` (a subprocess; wall time and peak RSS), and with ``--baseline
  DIR`` the same command from another source tree of surgery (an older commit: ``git worktree
  add /tmp/base <commit>``), interleaved with it, so a change is measured side by side,
* the naive route (a subprocess): build the model with transformers, ``surgery.apply``
  with the same arguments, load the checkpoint's state dict, ``surgery.revert``,
  ``save_pretrained``.

Peak RSS is each child's own ``ru_maxrss`` (``os.wait4``). The baseline constant is the
peak RSS of ``python -c "import surgery.cli"`` (python; the CLI imports no torch for
safetensors checkpoints). Both outputs are compared
tensor by tensor. Run:

    python examples/benchmarks/convert_bench.py            # ~2.3 GB, bf16, in a temp dir under /tmp
    python examples/benchmarks/convert_bench.py --layers 4 # smaller, for a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

MAKE = """
import sys, json, torch, surgery
from surgery.layers.mixout import MixLinear
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
cfg = AutoConfig.for_model("llama", **json.loads(sys.argv[2]))
dtype = getattr(torch, sys.argv[3])
model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
surgery.apply(model, mixout=0.1)
with torch.no_grad():  # stand-in for fine-tuning: weights move away from their targets
    for m in model.modules():
        if isinstance(m, MixLinear):
            m.weight.mul_(1.01)
model.save_pretrained(sys.argv[1], max_shard_size=sys.argv[4])
"""

NAIVE = """
import sys, json, torch, surgery
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), sys.argv[2]
cfg = json.loads((src / "config.json").read_text())
rec = cfg.pop("surgery")
cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, sys.argv[3]))
surgery.apply(model, mixout=rec["args"]["mixout"])
index = json.loads((src / "model.safetensors.index.json").read_text())
for shard in sorted(set(index["weight_map"].values())):
    model.load_state_dict(load_file(src / shard), strict=False)
surgery.revert(model)
model.save_pretrained(dst, max_shard_size=sys.argv[4])
"""

COMPARE = """
import sys, json, torch
from pathlib import Path
from safetensors import safe_open
def tensors(d):
    d = Path(d)
    if (d / "model.safetensors").exists():
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}, d
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return wm, d
(wa, a), (wb, b) = tensors(sys.argv[1]), tensors(sys.argv[2])
assert set(wa) == set(wb), set(wa) ^ set(wb)
n = 0
for k in wa:
    with safe_open(str(a / wa[k]), "pt") as fa, safe_open(str(b / wb[k]), "pt") as fb:
        x, y = fa.get_tensor(k), fb.get_tensor(k)
        assert x.dtype == y.dtype and torch.equal(x, y), k
        n += 1
print(n)
"""


def header(path: Path) -> dict[str, int]:
    """Tensor name -> bytes, from a safetensors header (plain json: this process stays small,
    so the forked children's ru_maxrss does not inherit torch's footprint)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__"}


def run(cmd: list[str], **kw) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, **kw)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(map(str, cmd))}")
    return wall, ru.ru_maxrss * 1024


def median(xs: list[tuple[float, int]]) -> tuple[float, int]:
    """Median wall time; the largest peak RSS of the runs."""
    ts = sorted(t for t, _ in xs)
    return ts[len(ts) // 2], max(r for _, r in xs)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=9, help="decoder layers (9 -> ~2.3 GB with targets in bf16)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--shard", default="500MB", help="max_shard_size of the saves")
    ap.add_argument("--dir", default="/tmp", help="where the temporary checkpoints go")
    ap.add_argument("--repeat", type=int, default=3, help="runs of cp / cp+fsync / convert (median reported)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--baseline", type=Path, help="another source tree of surgery whose convert is timed "
                                                  "alongside (interleaved) this one's")
    args = ap.parse_args()

    shape = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                 num_hidden_layers=args.layers, vocab_size=32000, tie_word_embeddings=False)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    per_layer = 4 * 2048 * 2048 + 3 * 2048 * 5632
    est = itemsize * (2 * per_layer * args.layers + 3 * 32000 * 2048)  # weights + targets (lm_head mixed too)
    free = shutil.disk_usage(args.dir).free
    print(subprocess.run(["df", "-h", args.dir], capture_output=True, text=True).stdout.strip())
    if free < 2.3 * est:
        raise SystemExit(f"need about {2.3 * est / 1e9:.1f} GB free in {args.dir}, have {free / 1e9:.1f} GB")

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.dir))
    src, cp_dst, dst, naive_dst = work / "src", work / "cp", work / "dst", work / "naive"
    base_env = base_dst = None
    if args.baseline is not None:
        base_env = dict(os.environ, PYTHONPATH=f"{args.baseline.resolve()}{os.pathsep}"
                                               f"{os.environ.get('PYTHONPATH', '')}")
        base_dst = work / "dst-baseline"
    try:
        print(f"building the surgered checkpoint in {src} ...", file=sys.stderr)
        t_make, _ = run([py, "-c", MAKE, str(src), json.dumps(shape), args.dtype, args.shard], env=env)
        size = du(src)
        idx = json.loads((src / "model.safetensors.index.json").read_text())
        sizes = {k: v for s in sorted(set(idx["weight_map"].values())) for k, v in header(src / s).items()}
        largest = max(sizes, key=sizes.get)
        targets = sum(v for k, v in sizes.items() if k.endswith(".mixout_target"))
        torch_info = subprocess.run([py, "-c", "import torch; print(torch.__version__, torch.get_num_threads())"],
                                    capture_output=True, text=True, check=True).stdout.split()

        _, base = run([py, "-c", "import surgery.cli"], env=env)  # also warms the import caches
        def settle() -> None:  # start each timed run with no dirty pages left by the previous one
            subprocess.run(["sync", "-f", str(work)], check=True)

        runs: dict[str, list[tuple[float, int]]] = {"cp": [], "cps": [], "cv": [], "start": [], "base": []}
        for _ in range(args.repeat):  # interleaved, so drifting load on the shared machine hits all alike
            settle()
            runs["cp"].append(run(["cp", "-r", str(src), str(cp_dst)]))
            shutil.rmtree(cp_dst)
            settle()
            runs["cps"].append(run(["sh", "-c", f"cp -r '{src}' '{cp_dst}' && sync '{cp_dst}' '{cp_dst}'/*"]))
            shutil.rmtree(cp_dst)
            settle()
            runs["cv"].append(run([py, "-m", "surgery", "convert", str(src), str(dst), "--quiet", "--overwrite"],
                                  env=env))
            if base_env is not None:
                settle()
                runs["base"].append(run([py, "-m", "surgery", "convert", str(src), str(base_dst), "--quiet",
                                         "--overwrite"], env=base_env))
            runs["start"].append(run([py, "-c", "import surgery.cli"], env=env))
        (t_cp, rss_cp), (t_cps, _), (t_cv, rss_cv), (t_start, _) = (median(runs[k])
                                                                    for k in ("cp", "cps", "cv", "start"))
        rows = [("cp -r", t_cp, rss_cp), ("cp -r && sync", t_cps, None), ("surgery convert", t_cv, rss_cv)]
        if base_env is not None:
            t_base, rss_base = median(runs["base"])
            rows.append(("surgery convert, baseline tree", t_base, rss_base))
        if not args.skip_naive:
            t_nv, rss_nv = run([py, "-c", NAIVE, str(src), str(naive_dst), args.dtype, args.shard], env=env)
            rows.append(("naive: load, apply, revert, save_pretrained", t_nv, rss_nv))
            same = subprocess.run([py, "-c", COMPARE, str(dst), str(naive_dst)], capture_output=True, text=True,
                                  env=env)
            verdict = (f"all {same.stdout.strip()} tensors bitwise equal" if same.returncode == 0
                       else f"DIFFER: {same.stderr.strip().splitlines()[-1]}")

        print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs (shared with other jobs; load average "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}), torch {torch_info[0]} "
              f"({torch_info[1]} threads), python {platform.python_version()}, {platform.system()} "
              f"{platform.release()}")
        print(f"checkpoint: llama-shaped, {args.layers} layers, {args.dtype}, {size / 1e9:.2f} GB in "
              f"{len(set(idx['weight_map'].values()))} shards of <= {args.shard}; Mixout targets "
              f"{targets / 1e9:.2f} GB; largest tensor {largest} {sizes[largest] / 2**20:.0f} MiB "
              f"(built in {t_make:.0f} s); page cache warm for every route")
        print(f"baseline RSS (python -c 'import surgery.cli'): {base / 2**20:.0f} MiB")
        print(f"wall time: median of {args.repeat} runs (naive route: 1 run); peak RSS: the largest of the runs")
        print(f"{'route':46s} {'wall s':>7s} {'x cp':>6s} {'peak RSS MiB':>13s} {'(RSS-base)/largest':>19s}")
        for name, t, rss in rows:
            ratio = f"{(rss - base) / sizes[largest]:19.2f}" if rss and name != "cp -r" else f"{'':19s}"
            r = f"{rss / 2**20:13.0f} {ratio}" if rss else f"{'':13s} {'':19s}"
            print(f"{name:46s} {t:7.2f} {t / t_cp:6.2f} {r}")
        print(f"convert vs cp -r: {t_cv / t_cp:.2f}x; vs cp -r && sync: {t_cv / t_cps:.2f}x (goal <= 1.2x: "
              f"{'met' if t_cv <= 1.2 * t_cps else 'NOT met'}); of convert's {t_cv:.2f} s, {t_start:.2f} s is "
              "starting python and importing the CLI (python -c 'import surgery.cli', no torch)")
        ok = rss_cv <= 1.5 * sizes[largest] + base
        print(f"convert peak RSS {rss_cv / 2**20:.0f} MiB = baseline {base / 2**20:.0f} MiB + "
              f"{(rss_cv - base) / sizes[largest]:.2f} x largest tensor (goal < 1.5x + baseline): "
              f"{'met' if ok else 'NOT met'}")
        if base_env is not None:
            print(f"convert vs the baseline tree ({args.baseline}): {t_cv / t_base:.2f}x wall time, peak RSS "
                  f"{rss_cv / 2**20:.0f} vs {rss_base / 2**20:.0f} MiB (the first of the {args.repeat} runs of each "
                  "writes a new DST, the others replace it: --overwrite)")
        if not args.skip_naive:
            print(f"convert output vs naive route output: {verdict}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
