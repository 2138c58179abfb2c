"""Sparse plans under diffusers' Ulysses context parallelism: two CPU processes (gloo) equal one process.

Each rank of a Ulysses group holds the whole sequence for a block of heads, so the plan's per-head patterns (skip heads
included) run there exactly, with the rank's heads mapped to their global indices. Ring attention is refused.

Wan is the family tested: of the others, only LTX has a context-parallel plan in diffusers 0.42.1, and its tiny
transformer fails there under Ulysses without sparsediff too (a shape error in its masked cross-attention); CogVideoX
and Mochi call SDPA themselves and take no parallel config, and HunyuanVideo has no `_cp_plan`.
"""

import os
import socket
import traceback

import pytest
import torch

import pipeline_factories
import sparsediff
from sparsediff.patterns import get_pattern
from sparsediff.pipelines.adapter import fingerprint
from sparsediff.plan import SparsePlan, StepRange

HEADS = 4
# heads 0-1 run on rank 0, heads 2-3 on rank 1: both blocks mix patterns and skip heads, and the layers differ
SPARSE_LAYERS = (
    ("diagonal_w0.5", "skip", "multi_diagonal_w1", "vertical_stripe_f1"),
    ("full", "multi_diagonal_w1", "skip", "skip"),
)


def sparse_plan(model) -> SparsePlan:
    layers = tuple(tuple(get_pattern(name) for name in layer) for layer in SPARSE_LAYERS)
    return SparsePlan(model=fingerprint(model), ranges=[StepRange(0.0, 1.0, layers)], block_size=8)


def inputs():
    g = torch.Generator().manual_seed(0)
    # 3 x 4 x 4 = 48 video tokens after patchify: 6 blocks of 8, split 24 + 24 across the two ranks
    return torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 16, 32, generator=g)


def run(plan: str, parallel_config=None) -> tuple[torch.Tensor, list]:
    model = pipeline_factories.wan_transformer(heads=HEADS)
    if parallel_config is not None:
        model.enable_parallelism(config=parallel_config)
    with torch.no_grad(), sparsediff.accelerate(model, sparse_plan(model) if plan == "sparse" else "dense",
                                                backend="torch", num_steps=1) as handle:
        out = model(*inputs(), return_dict=False)[0]  # diffusers' CP hooks gather tuples, not output classes
        return out, handle.stats


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from diffusers import ContextParallelConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.accelerator.device_count = lambda: 1  # enable_parallelism maps ranks to accelerators; CPU has none
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for plan in ("dense", "sparse"):
            out, stats = run(plan, ContextParallelConfig(ulysses_degree=world))
            results[plan] = (out, [(s.dense, s.heads_skipped) for s in stats])
        try:
            run("sparse", ContextParallelConfig(ring_degree=world))
        except ValueError as error:
            results["ring"] = str(error)
        model = pipeline_factories.wan_transformer(heads=HEADS)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        x, t, text = inputs()
        try:
            sparsediff.profile(model, [dict(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)],
                               block_size=8, progress=False)
        except ValueError as error:
            results["profile"] = str(error)
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ulysses")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(out_dir)), nprocs=2, join=True)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r} failed:\n{result['error']}"
    return results


@pytest.mark.parametrize("plan", ["dense", "sparse"])
def test_ulysses_degree_2_equals_one_process(ranks, plan):
    single, _ = run(plan)
    for result in ranks:  # the output is gathered at proj_out: every rank holds all of it
        torch.testing.assert_close(result[plan][0], single, rtol=1e-5, atol=1e-5)


def test_the_sparse_plan_ran_on_both_ranks_with_their_own_skip_heads(ranks):
    dense, _ = run("dense")
    sparse, _ = run("sparse")
    assert not torch.allclose(sparse, dense, atol=1e-3)  # the plan changes the output: the equality above is not vacuous
    # rank 0 (global heads 0-1) skips head 1 of layer 0; rank 1 (heads 2-3) skips both its heads of layer 1, where
    # taking its local heads for heads 0-1 would have skipped one
    assert [result["sparse"][1] for result in ranks] == [[(False, 1)], [(False, 2)]]


def test_profiling_under_context_parallelism_refuses_and_names_the_fix(ranks):
    for result in ranks:
        assert "cannot profile a model under context parallelism; profile on one process" in result["profile"]


def test_ring_attention_refuses_a_sparse_plan_and_names_the_fix(ranks):
    for result in ranks:
        assert "ring attention (ring_degree=2)" in result["ring"]
        assert "ContextParallelConfig(ulysses_degree=2)" in result["ring"]


def test_generate_video_ulysses_starts_one_process_per_gpu_through_torchrun(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    from sparsediff.cli import main
    from sparsediff.pipelines import parallel

    argv = ["generate", "video", "--prompt", "a red square", "--out", str(tmp_path / "clip.mp4"), "--ulysses", "2"]
    if torch.cuda.device_count() < 2:  # here: the error names the GPUs it needs
        assert main(argv) == 2
        assert f"Ulysses degree 2 needs 2 CUDA GPUs, one per rank, but this machine has {torch.cuda.device_count()}" in capsys.readouterr().err
    launched = []
    monkeypatch.setattr(parallel, "check_gpus", lambda degree: None)
    monkeypatch.setattr(subprocess, "call", lambda command: launched.append(command) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(argv) == 0
    assert launched == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         "-m", "sparsediff.cli", *argv]]
