"""Run one of FusionBench's own merge implementations on safetensors checkpoints and save the
merged model: the reference the anchor tests (tests/cli/test_merge_literature.py) and
benchmarks/literature.py compare surgery's methods against.

Runs inside a separate virtual environment with FusionBench (it needs transformers<5)::

    python -m venv /work/venvs/fusion
    /work/venvs/fusion/bin/pip install torch==2.13.0
    /work/venvs/fusion/bin/pip install fusion-bench "transformers<5" "datasets<4"
    /work/venvs/fusion/bin/python benchmarks/fusionbench_driver.py tsv BASE OUT M1 M2 M3 [--param alpha=1.0] [--dtype float32]

Methods and the FusionBench classes they run (configuration: FusionBench's YAML defaults,
overridable with ``--param``; models in the given order, never shuffled):

    tsv      fusion_bench.method.TaskSingularVectorMerging   alpha=1
    iso_c    fusion_bench.method.ISO_C_Merge                 scaling_factor=1.0
    iso_cts  fusion_bench.method.ISO_CTS_Merge               scaling_factor=1.0, common_space_fraction=0.8
    dop      fusion_bench.method.dop.dop_general.DOPMerging  dop.yaml: alpha 0.8, lr 1e-4, num_steps 200,
                                                             mgda, ema (beta 0.999), svd_epsilon 0.99999, uv
    wudi     fusion_bench.method.WUDIMerging                 iter_num=400, embeddings excluded
    opcm     fusion_bench.method.opcm.opcm_general.OPCM      alpha=0.5

Tied output heads (SmolLM2, the tiny Llama fixtures) are replaced by ``nn.Identity`` before
merging: FusionBench walks leaf modules and state dicts, so it would count the tied head as a
second copy of the embedding, and DOP would optimise it as a Linear layer against the
embedding it has just averaged. The checkpoints hold the embedding once; surgery merges it once.
WUDI runs with the embedding in ``exclude_keys`` (surgery's default averages embeddings; an
embedding's interference matrices are vocabulary × vocabulary in FusionBench's form).

A failing SVD is retried, nothing else changes: on the SmolLM2 workload FusionBench's iso_cts
stops with ``linalg.svd: The algorithm failed to converge because the input matrix is
ill-conditioned or has too many repeated singular values`` (float32 ``gesdd`` on 2 threads; it
converges on 1) on the task-specific residual w − U_c U_cᵀ w of layers.3's down_proj
(iso_utils.py), which is exactly rank 117 of 576. The driver wraps ``torch.linalg.svd``: a call
that raises ``torch.linalg.LinAlgError`` is recomputed in float64 (``gesdd``, then SciPy's
``gesvd`` where that fails too) and cast back to the input's dtype; every retry is reported on
stderr and listed in the printed JSON (``svd_retries``, ``svd_retry_shapes``). A run whose SVDs
all converge is untouched.
"""

from __future__ import annotations

import argparse
import json
import time


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _retrying_svd(torch, retries: list):
    """``torch.linalg.svd`` that retries a call that fails to converge in float64 (see above)."""
    original = torch.linalg.svd

    def svd(a, full_matrices=True, *, driver=None, out=None):
        try:
            return original(a, full_matrices=full_matrices, driver=driver, out=out)
        except torch.linalg.LinAlgError as e:
            import sys

            retries.append(list(a.shape))
            print(f"fusionbench_driver: float32 SVD of a {tuple(a.shape)} matrix failed ({str(e).splitlines()[0]}); "
                  "retrying in float64", file=sys.stderr, flush=True)
            a64 = a.double()
            try:
                u, s, vh = original(a64, full_matrices=full_matrices)
            except torch.linalg.LinAlgError:      # LAPACK's gesvd (QR iteration) on the CPU, through SciPy
                import scipy.linalg

                u, s, vh = (torch.from_numpy(x).to(a.device) for x in scipy.linalg.svd(
                    a64.cpu().numpy(), full_matrices=full_matrices, lapack_driver="gesvd"))
            return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)

    torch.linalg.svd = svd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", choices=["tsv", "iso_c", "iso_cts", "dop", "wudi", "opcm"])
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--param", action="append", default=[], help="KEY=VALUE passed to the FusionBench class")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the saved model (float32 for anchor tests)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from fusion_bench.modelpool import BaseModelPool

    if args.threads:
        torch.set_num_threads(args.threads)
    retries: list = []
    _retrying_svd(torch, retries)
    torch.set_grad_enabled(args.method == "dop" or args.method == "wudi")
    params = {k: _value(v) for k, v in (p.split("=", 1) for p in args.param)}

    def load(path: str):
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        if m.config.tie_word_embeddings:
            m.lm_head = torch.nn.Identity()
        return m

    t0 = time.perf_counter()
    pool = BaseModelPool({"_pretrained_": load(args.base), **{f"m{i}": load(p) for i, p in enumerate(args.models)}})
    if args.method == "tsv":
        from fusion_bench.method import TaskSingularVectorMerging

        algo = TaskSingularVectorMerging(**{"alpha": 1, **params})
    elif args.method == "iso_c":
        from fusion_bench.method import ISO_C_Merge

        algo = ISO_C_Merge(**{"scaling_factor": 1.0, **params})
    elif args.method == "iso_cts":
        from fusion_bench.method import ISO_CTS_Merge

        algo = ISO_CTS_Merge(**{"scaling_factor": 1.0, "common_space_fraction": 0.8, **params})
    elif args.method == "dop":
        from fusion_bench.method.dop.dop_general import DOPMerging

        cfg = {"seed": 0, "shuffle_order": False, "save_on_every_step": False, "evaluate_on_every_step": False,
               "lr": 1e-4, "num_steps": 200, "mgda": True, "alpha": 0.8, "ema": True, "ema_beta": 0.999,
               "svd_epsilon": 0.99999, "svd_proj_space": "uv", **params}
        algo = DOPMerging(**cfg)
    elif args.method == "wudi":
        from fusion_bench.method import WUDIMerging

        embed = [n for n, p in pool.load_pretrained_model().named_parameters() if p.ndim == 2 and "embed" in n]
        algo = WUDIMerging(**{"iter_num": 400, "exclude_keys": embed, **params})
    else:
        from fusion_bench.method.opcm.opcm_general import OPCM

        algo = OPCM(**{"alpha": 0.5, "shuffle_order": False, "seed": 0, "save_on_every_step": False,
                       "evaluate_on_every_step": False, **params})
    merged = algo.run(pool)
    merged.to(getattr(torch, args.dtype)).save_pretrained(args.out)
    print(json.dumps({"method": args.method, "seconds": time.perf_counter() - t0, "params": params,
                      "svd_retries": len(retries), "svd_retry_shapes": retries}))


if __name__ == "__main__":
    main()
