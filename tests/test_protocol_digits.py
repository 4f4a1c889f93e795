"""The digits report's evidence: DMAE against random init at every sigma, and masked
reconstructions measured against flat blocks (fast: stages are stubbed where noted)."""

from __future__ import annotations

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dmae_jax import checks
from dmae_jax.errors import ConfigError
from dmae_jax.tasks import end_to_end
from dmae_jax.tasks.pretrain import flat_blocks, masked_patch_errors
from tests import helpers


def load_config(path: str, arg: str | None = None):
    """get_config(arg) of a config file, as config_flags loads it."""
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(helpers.REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ------------------------------------------------------------------ masked-patch errors


def _tiny_dmae(norm_pix_loss: bool):
    from flax import nnx

    from dmae_jax import defaults
    from dmae_jax.models import create_dmae

    return create_dmae(defaults.model("mu", img_size=8, patch_size=4, depth=1,
                                      decoder_width=32, decoder_depth=1, decoder_heads=1,
                                      norm_pix_loss=norm_pix_loss), rngs=nnx.Rngs(0))


def test_masked_patch_errors_count_only_the_masked_patches():
    rng = np.random.default_rng(0)
    clean, flat = rng.random((2, 2, 8, 8, 3), dtype=np.float32)
    mask = np.zeros((2, 4), np.float32)
    mask[0, [0, 3]] = mask[1, [1]] = 1.0  # 3 masked patches (2 x 2 grids of 4 x 4 patches)
    masked = np.kron(mask.reshape(2, 2, 2), np.ones((4, 4)))[..., None] > 0

    def errors(recon):
        return [float(e) for e in masked_patch_errors(
            jnp.asarray(clean), jnp.asarray(recon), jnp.asarray(flat), jnp.asarray(mask), 4)]

    mse, flat_mse = errors(np.where(masked, clean, 1.0 - clean))  # wrong only where visible
    assert mse == 0.0
    np.testing.assert_allclose(flat_mse, np.mean(((flat - clean)[masked.repeat(3, -1)]) ** 2),
                               rtol=1e-6)
    shifted = clean.copy()
    shifted[1, 0:4, 4:8] += 0.1  # a constant 0.1 error on one of the three masked patches
    np.testing.assert_allclose(errors(shifted)[0], 0.01 / 3, rtol=1e-5)


def test_flat_blocks_are_what_a_norm_pix_model_shows_when_it_predicts_nothing():
    model = _tiny_dmae(norm_pix_loss=True)
    rng = np.random.default_rng(1)
    noisy = jnp.asarray(rng.random((2, 8, 8, 3), dtype=np.float32))
    mask = jnp.asarray([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    flat = np.asarray(flat_blocks(model, noisy, mask, 0.25))
    np.testing.assert_array_equal(
        flat, np.asarray(model.pred_to_images(jnp.zeros((2, 4, 48)), noisy, 0.25)))
    patches = flat.reshape(2, 2, 4, 2, 4, 3)
    assert np.ptp(patches, axis=(2, 4)).max() < 1e-6  # flat inside every patch
    clean = jnp.asarray(rng.random((2, 8, 8, 3), dtype=np.float32))
    mse, flat_mse = masked_patch_errors(clean, jnp.asarray(flat), jnp.asarray(flat), mask, 4)
    assert float(mse) == float(flat_mse)  # grey blocks score exactly 1.00 x


def test_flat_blocks_of_a_pixel_target_model_use_only_the_visible_patches():
    model = _tiny_dmae(norm_pix_loss=False)
    rng = np.random.default_rng(2)
    noisy = rng.random((2, 8, 8, 3), dtype=np.float32)
    mask = np.asarray([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]], np.float32)
    flat = np.asarray(flat_blocks(model, jnp.asarray(noisy), jnp.asarray(mask), 0.25))
    visible = np.kron((1 - mask).reshape(2, 2, 2), np.ones((4, 4))) > 0
    for b in range(2):
        np.testing.assert_allclose(flat[b], np.broadcast_to(noisy[b][visible[b]].mean(0),
                                                            (8, 8, 3)), atol=1e-5)
    noisy[:, 4:, 4:] = 9.0  # patch 3 is masked in both images: the baseline ignores it
    np.testing.assert_allclose(
        np.asarray(flat_blocks(model, jnp.asarray(noisy), jnp.asarray(mask), 0.25)), flat,
        atol=1e-6)


# ------------------------------------------------------------------ the pipeline's report


def _rows(correct: list[int], radius: float) -> str:
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    lines += [f"{i}\t1\t{1 if c else 2}\t{radius if c else 0.0}\t{c}\t0:00:00.1"
              for i, c in enumerate(correct)]
    return "\n".join(lines) + "\n"


def test_compare_runs_the_random_init_baseline_at_every_sigma_and_reports_each(
        tmp_path, monkeypatch):
    """Stages stubbed: what runs, with which initialisation, and what the report says."""
    from dmae_jax.tasks import execute

    config = load_config("configs/digits.py", "compare,runlocal")
    assert config.random_init_baseline is True
    assert load_config("configs/digits.py", "runlocal").random_init_baseline is False
    calls = []

    def fake_pretrain(cfg, workdir):
        os.makedirs(os.path.join(workdir, "export"))
        open(os.path.join(workdir, "export", "meta.json"), "w").write("{}")
        recon = os.path.join(workdir, "reconstructions")
        os.makedirs(recon)
        for step, mse in ((2, 0.09), (4, 0.0123)):
            with open(os.path.join(recon, f"step_{step:06d}.json"), "w") as f:
                json.dump({"step": step, "images": 128, "masked_mse": mse,
                           "flat_block_mse": 0.0456, "norm_pix_loss": True}, f)
            open(os.path.join(recon, f"step_{step:06d}.png"), "wb").write(b"png")

    def fake_finetune(cfg, workdir):
        calls.append(("finetune", cfg.sigma, cfg.init_from, os.path.basename(workdir)))
        os.makedirs(os.path.join(workdir, "export"))
        open(os.path.join(workdir, "export", "meta.json"), "w").write("{}")

    def fake_certify(cfg, cert_dir):
        calls.append(("certify", cfg.task, cfg.log_name, cfg.get("checkpoint")))
        os.makedirs(cert_dir, exist_ok=True)
        random_init = "random_init" in cfg.log_name
        # DMAE ahead at 0.25 and 0.5 (the baseline certifies smaller radii), tied at 1.0.
        sigma = cfg.get("sigma", 1.0)
        good = [1, 1, 1, 0] if not random_init or sigma == 1.0 else [1, 0, 0, 0]
        with open(os.path.join(cert_dir, cfg.log_name), "w") as f:
            f.write(_rows(good, 0.2 if random_init and sigma < 1.0 else 0.5))

    stages = {"pretrain": fake_pretrain, "finetune": fake_finetune, "certify": fake_certify,
              "cascade": fake_certify}
    monkeypatch.setattr(execute, "run", lambda cfg, workdir: stages[cfg.task](cfg, workdir))
    together = []

    def fake_run_together(cfgs, workdirs):
        together.append(len(cfgs))
        for cfg, workdir in zip(cfgs, workdirs, strict=True):
            fake_finetune(cfg, workdir)

    monkeypatch.setattr(execute, "run_together", fake_run_together)
    work = str(tmp_path / "digits")
    end_to_end.run(config, work)

    assert together == [6], "every fine-tuning, DMAE-initialised and baseline, in one loop"
    finetunes = [c[1:] for c in calls if c[0] == "finetune"]
    pre_export = os.path.join(work, "pretrain", "export")
    for sigma in (0.25, 0.5, 1.0):
        assert (sigma, pre_export, f"finetune_{sigma}") in finetunes
        assert (sigma, "", f"finetune_{sigma}_random_init") in finetunes
        assert ("certify", "certify", f"certify_sigma_{sigma}_random_init.tsv",
                os.path.join(work, f"finetune_{sigma}_random_init", "export")) in calls
    assert len(finetunes) == 6

    report = open(os.path.join(work, "report.md")).read()
    assert "| 0.25 | 0.750 | 0.250 | 0.375 | 0.050 | r = 0, ACR |" in report
    assert "| 0.5 | 0.750 | 0.250 | 0.375 | 0.050 | r = 0, ACR |" in report
    assert "| 1.0 | 0.750 | 0.750 | 0.375 | 0.375 | neither |" in report
    assert ("Masked patches of 128 test images (step 4): reconstruction MSE 0.0123 in [0,1] "
            "pixels, 0.27 x the 0.0456 of flat blocks (each masked patch at its own noisy "
            "mean") in report
    assert open(os.path.join(work, "reconstructions.png"), "rb").read() == b"png"


def test_random_init_baseline_is_a_switch_not_a_sigma():
    import ml_collections

    # A config that still sets the old field value (a sigma) is refused by name.
    config = ml_collections.ConfigDict(
        {**load_config("configs/digits.py", "runlocal").to_dict(), "random_init_baseline": 0.25})
    with pytest.raises(ConfigError, match="config.random_init_baseline must be True .* got 0.25"):
        checks.end_to_end(config)


def test_without_baselines_or_evaluations_the_report_says_nothing_of_them(tmp_path):
    rows = {"sigma=0.25": [], "cascade": []}
    assert end_to_end.init_comparison(rows) == ""
    assert end_to_end.reconstruction_summary(str(tmp_path / "missing")) == ""


def test_pipeline_eta_counts_only_stages_that_did_work(monkeypatch, capsys):
    from dmae_jax.tasks import end_to_end

    clock = iter([0.0, 0.0, 0.5, 0.6, 40.6, 60.6])
    monkeypatch.setattr(end_to_end.time, "time", lambda: next(clock))
    stages = end_to_end._Stages(["a", "b", "c", "d", "e"], [2, 2, 4, 1, 1])
    for i in range(5):
        stages.start(i)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("===")]
    # a and b finished in an earlier invocation (under a second each): no estimate yet;
    # after c (weight 4) 40.6 s have passed, so d and e (weight 2) are ~20 s away; after d
    # 60.6 s for weight 5, so e (weight 1) ~12 s.
    assert [line.rsplit("ETA ", 1)[1] for line in lines] == ["?)", "?)", "?)", "20s)", "12s)"]
