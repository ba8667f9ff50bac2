"""B6: iLLaMA attention paths: the fused causal kernel vs the soft-mask path (and bidirectional for reference).

The same iLLaMA-Tiny weights, three settings of the soft-mask ratio r:
    fused   r = 0    scaled_dot_product_attention(is_causal=True), no mask tensor (after the soft-mask phase)
    soft    r = 0.5  one additive [N, N] mask (0 / log r) built per forward and shared by all blocks
    bidir   r = 1    no mask (reference: what a ViT-style encoder pays)
For each, a training step (forward + backward + AdamW step) and an inference forward are timed at two
shapes: CIFAR (32 px, patch 4, 65 tokens, batch 128) and ImageNet-like (224 px, patch 16, 197 tokens,
batch 16). Rounds interleave the paths (rotating their order) so drift on a shared machine hits all of
them; the result is the median per path and the ratios soft/fused and bidir/fused.

    python benchmarks/b6_illama_attention.py               # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

PATHS = {"fused": 0.0, "soft": 0.5, "bidir": 1.0}
SHAPES = {"cifar_32px_p4_b128": (32, 4, 128), "imagenet_224px_p16_b16": (224, 16, 16)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per path per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.result_path("b6_illama_attention")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from visrep.models import build_backbone

    load = common.load_check("b6")
    results = {}
    for shape, (size, patch, batch) in SHAPES.items():
        torch.manual_seed(0)
        # the renormalised soft-mask form: the one with a fused causal kernel at r = 0 (the official form has none)
        model = build_backbone("illama_tiny", image_size=size, patch_size=patch, soft_mask_form="renormalised")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, size, size)
        times = {p: {"train": [], "infer": []} for p in PATHS}

        def train_step():
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()

        @torch.inference_mode()
        def infer():
            model(x)

        for r in range(args.rounds + 1):  # round 0 warms up every path, not recorded
            order = list(PATHS)[r % 3:] + list(PATHS)[:r % 3]
            for path in order:
                model.soft_mask_current.fill_(PATHS[path])
                model.train()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    train_step()
                t_train = (time.perf_counter() - t0) / args.steps
                model.eval()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    infer()
                t_inf = (time.perf_counter() - t0) / args.steps
                if r > 0:
                    times[path]["train"].append(t_train)
                    times[path]["infer"].append(t_inf)
            print(f"b6: {shape} round {r} done", flush=True)
        med = {p: {k: common.median(v) for k, v in t.items()} for p, t in times.items()}
        results[shape] = {
            "image_size": size, "patch_size": patch, "batch": batch, "tokens": (size // patch) ** 2 + 1,
            "median_s": med, "per_round_s": times,
            "ratio_soft_over_fused": {k: med["soft"][k] / med["fused"][k] for k in ("train", "infer")},
            "ratio_bidir_over_fused": {k: med["bidir"][k] / med["fused"][k] for k in ("train", "infer")},
            "images_per_s": {p: {k: batch / v for k, v in m.items()} for p, m in med.items()},
        }
        print(shape, {p: {k: round(v, 4) for k, v in m.items()} for p, m in med.items()},
              results[shape]["ratio_soft_over_fused"], flush=True)
    common.write_json(args.out, {
        "benchmark": "b6_illama_attention", "machine": common.machine_info(), "load_at_start": load,
        "setup": {"model": "illama_tiny (192/12/3), RoPE 1-D", "rounds": args.rounds, "steps_per_round": args.steps,
                  "train_step": "forward + mean-square loss on the class token + backward + AdamW step",
                  "paths": {p: f"soft_mask_current = {r}" for p, r in PATHS.items()}},
        "results": results})


if __name__ == "__main__":
    main()
