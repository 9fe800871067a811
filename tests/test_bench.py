"""sur_lib.study.bench: the CPU tiny profile end to end, FLOP bookkeeping, the RTX 3090 estimate, the
OOM / memory-cap logic (with a fake out-of-memory error) and the SD 1.5 FLOP count on meta tensors.

FLOP ratios used below, derived. Let F be one UNet forward. A weight layer's backward costs one
matmul/convolution for the input gradient and one for the weight gradient, each as much as its
forward. The frozen UNet of the paper path needs input gradients only (down to the earliest
cross-attention, where the conditioning enters): ~F, so the paper path's UNet costs ~2F (a little
less because the layers before the first cross-attention need no gradient, a little more because
FlopCounterMode counts attention's backward at 2.5x its forward; SD 1.5: 2.08F, the tiny UNet:
~1.8F). The full fine-tune adds the weight gradients: ~3F. Gradient checkpointing re-runs the
forward of the checkpointed blocks in the backward: between 2F and 3F on the paper path.
"""
import json
import math

import pytest
import torch

from sur_lib.study import bench
from sur_lib.study.bench import step as bench_step
from sur_lib.study.bench import (
    BenchConfig,
    StepSpec,
    find_largest_batch,
    is_oom,
    peak_tflops,
    rtx3090_estimate,
    unet_forward_flops,
)

BASE = ("official", "paper", "paper+ckpt", "full", "full+ckpt")
LEVER_CONFIGS = ("paper+cache_latents", "paper+channels_last", "paper+compile", "paper+bf16",
                 "paper+fused_adamw", "paper+all")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The CPU tiny profile, run once through the CLI entry point; (result, path of the JSON)."""
    out = tmp_path_factory.mktemp("bench") / "bench_cpu-tiny.json"
    result = bench.main(["--profile", "tiny", "--out", str(out)])
    return result, out


def test_tiny_profile_runs_on_the_cpu_and_records_its_time(tiny):
    """The run records its profile, device and time (how fast it is belongs to the benchmark's
    record, data/results/bench_cpu-tiny.json, not to a test)."""
    result, _ = tiny
    assert 0 < result["cpu_time_s"] and 0 < result["wall_time_s"]
    assert result["config"]["profile"] == "tiny" and result["device"]["type"] == "cpu"


def test_every_configuration_is_measured(tiny):
    result, _ = tiny
    configs = result["configs"]
    assert set(configs) == set(BASE + LEVER_CONFIGS)
    for name in BASE + LEVER_CONFIGS:
        rec = configs[name]
        if name == "paper+compile":  # skipped on a CPU by default, and says why
            assert rec["status"] == "skipped" and "compile" in rec["reason"]
            continue
        assert rec["status"] == "ok", (name, rec)
        assert rec["batch"] == 4
        assert rec["step_time_s"] > 0 and all(t > 0 for t in rec["step_times_s"])
        assert len(rec["step_times_s"]) == 3
        assert rec["samples_per_s"] == pytest.approx(4 / rec["step_time_s"])
        assert rec["flops_per_step"]["total"] > 0
        assert rec["achieved_tflops"] == pytest.approx(rec["flops_per_step"]["total"] / rec["step_time_s"] / 1e12)
        assert rec["peak_allocated_gib"] is None and rec["mfu"] is None  # CPU: no memory counter, no peak
        assert rec["vs_full"]["samples_per_s"] == pytest.approx(
            rec["samples_per_s"] / configs["full"]["samples_per_s"])
    assert configs["paper+all"]["levers_skipped"] == ["compile"]
    assert set(configs["paper+all"]["levers_applied"]) == {"cache_latents", "channels_last", "bf16", "fused_adamw"}
    assert configs["paper+bf16"]["precision"] == "bf16" and configs["paper"]["precision"] == "fp32"
    effects = result["summary"]["lever_effect_vs_base"]
    assert set(effects) == set(LEVER_CONFIGS) - {"paper+compile"}


def test_flops_are_consistent(tiny):
    result, _ = tiny
    c = result["configs"]
    unet = {n: c[n]["flops_per_step"]["unet"] for n in BASE}
    fwd = c["official"]["unet_forward_flops"]
    assert fwd == result["flops"]["unet_forward_at_batch"] > 0
    assert unet["official"] == fwd  # forward only, under no_grad
    assert c["official"]["model_flops_per_step"] == 2 * fwd  # the MFU numerator (bench.MFU_DEFINITION)
    assert 1.5 < unet["paper"] / fwd < 2.4  # forward + input gradients
    assert unet["paper"] < unet["paper+ckpt"] <= unet["paper"] + fwd  # + recomputation
    assert 2.7 < unet["full"] / fwd < 3.3  # + weight gradients
    assert unet["full"] < unet["full+ckpt"] <= unet["full"] + fwd
    # levers that do not change the arithmetic do not change the count; cached latents drop the VAE
    for name in ("paper+channels_last", "paper+bf16", "paper+fused_adamw"):
        assert c[name]["flops_per_step"] == c["paper"]["flops_per_step"]
    cached = c["paper+cache_latents"]["flops_per_step"]
    assert cached["unet"] == unet["paper"]
    assert cached["vae_and_other"] < c["paper"]["flops_per_step"]["vae_and_other"] / 10
    for rec in (c[n] for n in BASE):
        f = rec["flops_per_step"]
        assert f["total"] == sum(v for k, v in f.items() if k != "total")

    # the paper's shape (SD 1.5, batch 16, 512 px), counted on meta tensors
    paper = result["flops"]["paper_shape"]["per_step"]
    sd_fwd = result["flops"]["paper_shape"]["unet_forward"]
    assert sd_fwd == pytest.approx(12.85e12, rel=0.01)  # FlopCounterMode, H100 run: 12.85 TFLOP
    assert 1.9 < paper["paper"]["unet"] / sd_fwd < 2.3
    assert 2.9 < paper["full"]["unet"] / sd_fwd < 3.1
    assert paper["paper"]["unet"] < paper["paper+ckpt"]["unet"] <= paper["paper"]["unet"] + sd_fwd
    # the VAE encoder at 512 px costs more than the UNet forward: why caching latents matters
    assert paper["official"]["vae_and_other"] > sd_fwd
    assert paper["paper+cache_latents"]["total"] < paper["paper"]["total"] - sd_fwd


def test_json_has_the_required_keys(tiny):
    result, path = tiny
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result))
    assert "partial" not in data  # the partial file written after each configuration was replaced
    for key in ("command", "date", "versions", "device", "config", "configs", "flops", "mfu_definition",
                "summary", "rtx3090_estimate", "knowledge_throughput", "notes", "wall_time_s", "cpu_time_s"):
        assert key in data, key
    assert data["command"].startswith("python -m sur_lib.study.bench") and "--profile tiny" in data["command"]
    for pkg in ("python", "torch", "diffusers", "transformers", "sur_lib"):
        assert data["versions"][pkg]
    assert data["device"]["name"] and data["device"]["slug"] == "cpu"
    assert "2 * F_unet_fwd" in data["mfu_definition"]


def test_rtx3090_estimate_follows_from_the_json(tiny):
    _, path = tiny
    data = json.loads(path.read_text())
    est = data["rtx3090_estimate"]
    assert est["peak_tflops"] == 71.0 and est["steps"] == 5000 and est["method"]
    u, (low, high) = est["assumed_utilisation"], est["utilisation_range"]
    per_step = data["flops"]["paper_shape"]["per_step"]
    assert set(est["per_config"]) == set(per_step)
    for name, row in est["per_config"].items():
        assert row["flops_per_step"] == per_step[name]["total"]
        hours = est["steps"] * row["flops_per_step"] / (est["peak_tflops"] * 1e12 * u) / 3600
        assert row["hours"] == pytest.approx(hours)
        assert row["hours_range"] == pytest.approx([hours * u / high, hours * u / low])
    hours = {k: v["hours"] for k, v in est["per_config"].items()}
    assert hours["official+cache_latents"] < hours["official"] < hours["paper"] < hours["full"]
    assert 0.5 < hours["paper"] < 10  # SD 1.5 at batch 16: hours, not minutes or days


def test_knowledge_throughput(tiny):
    result, _ = tiny
    k = result["knowledge_throughput"]
    assert k["tiny-llama-cpu"]["status"] == "ok" and k["tiny-llama-cpu"]["prompts_per_s"] > 0
    assert k["tiny-llama-cpu"]["batch"] == 32
    if not torch.cuda.is_available():
        assert k["llama-7b-shape"]["status"] == "skipped: no GPU"
    assert k["smollm2-135m-cpu"]["status"].startswith("skipped")


# ------------------------------------------------------------------------------ OOM and the cap


def _fake_measure(limit):
    def measure(b):
        if b > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake: batch {b} > {limit})")
        return {"batch": b, "step_time_s": 0.1 * b, "samples_per_s": 10.0}
    return measure


def test_find_largest_batch_halves_until_it_fits():
    freed = []
    rec = find_largest_batch(_fake_measure(4), 16, on_oom=lambda: freed.append(1))
    assert rec["status"] == "oom" and rec["batch"] == 16
    assert rec["oom_batches"] == [16, 8] and len(freed) == 2
    assert rec["largest_fitting_batch"] == 4 and rec["gradient_accumulation"] == 4
    assert rec["effective_batch"] == 16 and rec["at_largest_batch"]["batch"] == 4

    assert find_largest_batch(_fake_measure(16), 16, on_oom=lambda: None) == {
        "status": "ok", "batch": 16, "step_time_s": 1.6, "samples_per_s": 10.0}
    nothing = find_largest_batch(_fake_measure(0), 16, on_oom=lambda: None)
    assert nothing["largest_fitting_batch"] is None and nothing["oom_batches"] == [16, 8, 4, 2, 1]
    no_search = find_largest_batch(_fake_measure(4), 16, search=False, on_oom=lambda: None)
    assert no_search["status"] == "oom" and no_search["largest_fitting_batch"] is None
    assert no_search["oom_batches"] == [16]
    odd = find_largest_batch(_fake_measure(3), 12, on_oom=lambda: None)  # 12 -> 6 -> 3
    assert (odd["largest_fitting_batch"], odd["gradient_accumulation"]) == (3, 4)

    def broken(b):
        raise ValueError("not a memory problem")
    with pytest.raises(ValueError):
        find_largest_batch(broken, 16, on_oom=lambda: None)


def test_is_oom_sees_wrapped_errors():
    assert is_oom(torch.cuda.OutOfMemoryError("x"))
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except Exception as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as outer:
        assert is_oom(outer)
    assert not is_oom(ValueError("shape mismatch"))


def test_bench_reports_oom_and_the_accumulation_that_restores_the_batch(monkeypatch, tmp_path):
    """Every step at batch > 4 'runs out of memory': all configurations say so, with batch 4 x 4."""
    real = bench._measure

    def measure(state, spec, batch_size, cfg):
        if batch_size > 4:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake, batch {batch_size})")
        return real(state, spec, batch_size, cfg)

    monkeypatch.setattr(bench_step, "_measure", measure)
    result = bench.run_bench(BenchConfig(profile="tiny", batch=16, levers=("none",), llm=False, cap_gib=24,
                                         out=str(tmp_path / "oom.json")), log=lambda msg: None)
    assert set(result["configs"]) == set(BASE)
    for name in BASE:
        rec = result["configs"][name]
        assert rec["status"] == "oom" and rec["batch"] == 16, (name, rec)
        assert rec["oom_batches"] == [16, 8]
        assert rec["largest_fitting_batch"] == 4 and rec["gradient_accumulation"] == 4
        assert rec["at_largest_batch"]["step_time_s"] > 0
        assert rec["vs_full"]["reference_batch"] == 4
        assert result["summary"]["fits"][name] == {"status": "oom", "batch": 16, "largest_fitting_batch": 4,
                                                   "gradient_accumulation": 4}
    assert result["device"]["memory_cap"]["applied"] is False  # no GPU here: nothing to cap
    assert json.loads((tmp_path / "oom.json").read_text())["configs"]["paper"]["status"] == "oom"


# ------------------------------------------------------------------------------ small pieces


def test_sd15_unet_forward_flops_on_meta_tensors():
    from sur_lib.infra.backbone_files import sd15_configs

    unet = sd15_configs()["unet"]
    per_sample = unet_forward_flops(unet, 1, 64, 77, 768)
    assert 0.75e12 < per_sample < 0.85e12  # 12.85 TFLOP at batch 16 (H100 run)
    assert unet_forward_flops(unet, 16, 64, 77, 768) == pytest.approx(16 * per_sample, rel=1e-3)


def test_rtx3090_estimate_formula():
    est = rtx3090_estimate({"x": 71e12 * 0.5}, steps=3600, utilisation=(0.5, 0.25, 1.0))
    assert est["per_config"]["x"]["hours"] == pytest.approx(1.0)
    assert est["per_config"]["x"]["hours_range"] == pytest.approx([0.5, 2.0])


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3")["bf16"] == 989.4
    assert peak_tflops("NVIDIA H100 PCIe")["bf16"] == 756.5
    assert peak_tflops("NVIDIA H200")["bf16"] == 989.4
    assert peak_tflops("NVIDIA GeForce RTX 3090")["fp16"] == 71.0
    assert peak_tflops("NVIDIA GeForce RTX 3090 Ti")["fp16"] == 80.0
    assert peak_tflops("Some Other Accelerator") is None


def test_specs_and_cli():
    names = [s.name for s in bench.specs_for(BenchConfig(profile="tiny").resolved())]
    assert names[:3] == ["official", "paper", "paper+ckpt"] and names[-2:] == ["full", "full+ckpt"]
    for name in names + ["paper+ckpt+cache_latents", "full+all"]:
        assert StepSpec.from_name(name).name == name
    with pytest.raises(ValueError):
        StepSpec.from_name("paper+turbo")

    cfg = bench.parse_args(["--profile", "tiny", "--levers", "none,cache_latents", "--cap-gib", "24",
                            "--lever-paths", "paper,official", "--llm-dim", "4096"]).resolved()
    assert cfg.levers == ("none", "cache_latents") and cfg.lever_paths == ("paper", "official")
    assert (cfg.batch, cfg.resolution, cfg.steps, cfg.precision, cfg.llm_dim) == (4, 16, 3, "fp32", 4096)
    assert "--cap-gib 24" in cfg.command
    assert bench.default_out(cfg, torch.device("cpu")) == "data/results/bench_cpu-tiny-cap24gib.json"
    assert [s.name for s in bench.specs_for(cfg)][-4:-2] == ["paper+cache_latents", "official+cache_latents"]
    only = BenchConfig(profile="tiny", only=("full", "paper+compile", "official")).resolved()
    assert [s.name for s in bench.specs_for(only)] == ["official", "paper+compile", "full"]
    with pytest.raises(ValueError):
        BenchConfig(profile="tiny", only=("paper+turbo",)).resolved()
    paper = bench.parse_args([]).resolved()
    assert (paper.profile, paper.batch, paper.resolution, paper.precision) == ("paper", 16, 512, "fp16")
    with pytest.raises(ValueError):
        BenchConfig(profile="tiny", levers=("turbo",)).resolved()
    assert math.isclose(bench.RTX3090["fp16_tensor_fp32_accumulate_tflops"], 71.0)
