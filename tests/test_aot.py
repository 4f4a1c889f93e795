"""Compile-only mode: real steps compiled for a named TPU topology on this CPU machine.

Needs libtpu, which the test extra installs (`pip install -e ".[test]"` brings jax[tpu]).
"""

import dataclasses
import importlib.util

import pytest

from dmae_jax import aot, defaults

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: pip install -e \".[test]\" (or .[tpu-compile]) brings it",
)


def _digits_pretrain(**overrides):
    cfg = defaults.digits_pretrain()
    cfg.batch_size = 64
    cfg.total_steps = 100
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def v4_8():
    topology = aot.resolve_topology("v4-8")
    return topology, aot.topology_devices(topology)


@pytest.fixture(scope="module")
def pretrain_report(v4_8):
    topology, devices = v4_8
    return aot.compile_config(_digits_pretrain(), topology, devices=devices)


def test_resolve_topology_names():
    assert aot.resolve_topology("v4-128").topology_name == "v4:4x4x4"
    assert aot.resolve_topology("v4-32").topology_name == "v4:2x2x4"
    assert aot.resolve_topology("v5p-128").topology_name == "v5:4x4x4"
    assert aot.resolve_topology("v5litepod-16").topology_name == "v5e:4x4"
    assert aot.resolve_topology("v5e:4x4").accelerator_type == "v5e-16"
    with pytest.raises(ValueError, match="v4 slices come in"):
        aot.resolve_topology("v4-12")
    with pytest.raises(ValueError, match="--topology must be"):
        aot.resolve_topology("tpu-128")


def test_pretrain_step_figures_are_present_and_sane(v4_8, pretrain_report):
    topology, devices = v4_8
    assert len(devices) == 4 and devices[0].device_kind == "TPU v4"
    cfg = _digits_pretrain()
    report = pretrain_report
    from flax import nnx

    from dmae_jax.models import count_params, create_dmae

    params = count_params(nnx.eval_shape(lambda: create_dmae(cfg.model, rngs=nnx.Rngs(0))),
                          nnx.Param)
    # The state (params + two AdamW moments, float32, replicated) is an argument.
    assert report.argument_bytes >= 3 * 4 * params
    assert report.output_bytes > 0 and report.temp_bytes > 0
    assert report.alias_bytes > 0  # the state is donated
    assert report.fits and 0 < report.total_bytes < topology.chip.hbm_bytes
    # XLA's FLOP count agrees with the analytic matmul count within the non-matmul work.
    assert 0.8 < report.xla_flops / report.model_flops < 1.5
    assert 0 < report.step_seconds < 1.0
    assert report.items_per_sec_per_chip == pytest.approx(64 / 4 / report.step_seconds)
    assert 0 < report.mfu < 1
    text = report.format()
    for word in ("arguments", "temporaries", "HBM", "FLOPs", "images/s per chip", "MFU"):
        assert word in text

    # Gradient accumulation: the scan's body is counted once by XLA; the report scales it.
    acc = aot.compile_config(_digits_pretrain(accum_steps=2), topology, devices=devices)
    assert acc.xla_flops == pytest.approx(report.xla_flops, rel=0.1)

    # A report that does not fit says so and names what to change.
    small = dataclasses.replace(topology, chip=dataclasses.replace(topology.chip, hbm_bytes=1))
    assert not dataclasses.replace(report, topology=small).fits
    advice = aot._fit_advice("train", report.settings)
    for knob in ("model.remat", "mesh.fsdp=2", "accum_steps=2"):
        assert knob in advice


def test_fsdp_shards_the_state(v4_8, pretrain_report):
    topology, devices = v4_8
    cfg = _digits_pretrain()
    cfg.mesh.fsdp = 4
    sharded = aot.compile_config(cfg, topology, devices=devices)
    assert sharded.argument_bytes < 0.5 * pretrain_report.argument_bytes
    assert sharded.xla_flops == pytest.approx(pretrain_report.xla_flops, rel=0.2)


def test_finetune_step(v4_8):
    topology, devices = v4_8
    cfg = defaults.digits_finetune(0.25)
    cfg.batch_size, cfg.total_steps = 32, 100
    report = aot.compile_config(cfg, topology, devices=devices)
    assert report.fits and report.step_seconds > 0 and report.alias_bytes > 0
    # Two noisy copies per image: the model FLOPs count both.
    assert 0.8 < report.xla_flops / report.model_flops < 1.5
    assert "finetune classifier mu/4" in report.format()


def test_certify_step_on_one_host(v4_8):
    topology, devices = v4_8
    cfg = defaults.certify("digits", 0.25)
    report = aot.compile_config(cfg, topology, variant="mu", devices=devices)
    assert report.num_chips == 4 and report.item == "samples"
    assert report.items_per_step == cfg.batch_size
    assert report.fits and report.step_seconds > 0
    assert 0.5 < report.xla_flops / report.model_flops < 3


def test_errors_name_what_to_change(v4_8):
    topology, devices = v4_8
    with pytest.raises(ValueError, match="multiple of the 4 chips"):
        aot.compile_config(_digits_pretrain(batch_size=6), topology, devices=devices)
    with pytest.raises(ValueError, match="--variant"):
        aot.compile_config(defaults.certify("digits", 0.25), topology, devices=devices)


def test_bf16_steps_reduce_float32_gradients_and_move_no_image(v4_8):
    # XLA:CPU computes bfloat16 dots in float32, so only a TPU-compiled step shows the
    # dtype the gradient all-reduce runs in.
    topology, devices = v4_8
    finetune = defaults.digits_finetune(0.25)
    finetune.batch_size, finetune.total_steps = 32, 100
    for cfg in (_digits_pretrain(), finetune):
        cfg.model.dtype = "bfloat16"
        report = aot.compile_config(cfg, topology, devices=devices)
        col = report.collectives
        assert col.count["all-reduce"] >= 1, col.line()
        assert col.dtypes["all-reduce"] == {"f32"}, (cfg.task, col.line())
        assert col.count["all-to-all"] == col.count["collective-permute"] == 0, col.line()
    text = report.format()
    assert col.line() in text and "gradients reduced in f32" in text
    assert "bfloat16 compute" in text and "matmul precision default" in text
    assert "(bfloat16 logits)" in text
    # Control: a plain ViT whose weight gradients are autodiff's bfloat16 products sums
    # them in bfloat16 before converting to the float32 parameters' gradients.
    reference = aot.compile_reference(cfg, topology, devices=devices)
    assert "bf16" in reference.collectives.dtypes["all-reduce"], reference.collectives.line()
