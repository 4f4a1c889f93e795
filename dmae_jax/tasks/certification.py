"""The `certify` and `cascade` tasks: certify a data set with an exported classifier.

`certify`: Cohen et al.'s CERTIFY at one sigma, one log row per image (Cohen et al.'s TSV
columns idx, label, predict, radius, correct, time, then ours), resumable. `cascade`: the
multi-scale cascade of Jeong & Shin over several sigmas, either with one fine-tuned
classifier per sigma (`config.checkpoints`) or with one classifier behind a denoiser for
every sigma (`config.checkpoint` + `config.denoiser`).

  python -m dmae_jax.main --config=configs/certify.py:sigma=0.5 --workdir=runs/cert \
      --config.checkpoint=runs/ft_050/export
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from absl import logging

from dmae_jax import checks as C
from dmae_jax import config as config_lib
from dmae_jax import exports

DTYPES = ("float32", "bfloat16")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the certification fields (both tasks) before any work."""
    from dmae_jax.data import datasets

    C.one_of(config, "data.dataset", datasets.DATASETS)
    C.positive(config, "n0")
    C.positive(config, "n")
    C.in_range(config, "alpha", 1e-300, 1.0)
    C.positive(config, "batch_size")
    C.positive(config, "skip")
    if isinstance(config.max, bool) or not isinstance(config.max, int) or not (
            config.max == -1 or config.max >= 1):
        raise C.ConfigError(f"config.max must be -1 (every image) or >= 1, got {config.max!r}")
    C.one_of(config, "compute_dtype", DTYPES)
    C.one_of(config, "noise", ("float", "sound"))
    C.one_of(config, "mode", ("fixed", "sequential"))
    if config.mode == "sequential":
        if config.n_max != 0:
            C.positive(config, "n_max")
        if config.early_abstain:
            raise C.ConfigError("config.early_abstain reads the label; sequential "
                                "certification is label-free: use mode=fixed or drop it")
    if config.task == "certify":
        C.positive(config, "sigma")
        exports.load_checked(config.checkpoint, kind="classifier", field="config.checkpoint")
    else:
        sigmas = C.sigmas(config, "sigmas")
        C.in_range(config, "p0", 1e-12, 1.0)
        C.one_of(config, "alpha_split", ("sound", "official"))
        per_sigma = list(config.get("checkpoints") or [])
        if per_sigma and len(per_sigma) != len(sigmas):
            raise C.ConfigError(
                f"config.checkpoints must have one classifier per sigma ({len(sigmas)}), got "
                f"{len(per_sigma)}")
        if not per_sigma:
            exports.load_checked(config.checkpoint, kind="classifier", field="config.checkpoint")
        for i, path in enumerate(per_sigma):
            exports.load_checked(path, kind="classifier", field=f"config.checkpoints[{i}]")
    if config.get("denoiser"):
        from dmae_jax.diffusion import loading

        C.one_of(config, "denoiser_kind", loading.DENOISER_KINDS)
        loading.check_export(config.denoiser, config.denoiser_kind, field="config.denoiser")


def load_classifier(path: str, *, field: str = "config.checkpoint", dtype: str | None = None):
    """A jit-friendly logits_fn ([B,H,W,C] in [0,1] -> [B,K]) and the export's meta.

    `dtype` (float32 | bfloat16) sets the compute dtype of the blocks, whatever the
    classifier was trained with (the papers certified under fp16 autocast).
    """
    from flax import nnx

    from dmae_jax.models import classifier

    parts, meta = classifier.from_export(path, field=field)
    if dtype is not None and dtype != meta["model"].get("dtype"):
        model = classifier.create_classifier({**meta["model"], "dtype": dtype},
                                             meta["num_classes"], rngs=nnx.Rngs(0))
        parts = type(parts).split(model).with_params(parts.params, where=f"{field} = {path!r}")

    def apply(params, images):
        return parts.bind(params)(images)

    return jax.tree_util.Partial(apply, jax.tree.map(jax.numpy.asarray, parts.params)), meta


def _logits_fns_for(config, classifier_fns, sigmas) -> list:
    """One logits_fn per sigma: the classifier, behind the denoiser when one is configured.

    The denoiser export is read once for all sigmas (`load_denoise_fns` shares its weights),
    so a cascade costs the memory of one UNet, not one per sigma.
    """
    if not config.get("denoiser"):
        return list(classifier_fns)
    from dmae_jax.diffusion import denoise, loading

    denoise_fns = loading.load_denoise_fns(config.denoiser, config.denoiser_kind, sigmas)
    return [denoise.denoise_then_classify(d, c)
            for d, c in zip(denoise_fns, classifier_fns, strict=True)]


def place_once(fns: list) -> list:
    """`place_replicated` over pytree logits_fns; an array several of them share is copied once.

    The cascade's logits_fns share the denoiser's (and possibly a classifier's) arrays, so
    the devices hold one copy of each model, however many sigmas use it.
    """
    from dmae_jax.smoothing.sampling import place_replicated

    placed: dict[int, jax.Array] = {}

    def place(leaf):
        if id(leaf) not in placed:
            placed[id(leaf)] = place_replicated(leaf)
        return placed[id(leaf)]

    return jax.tree.map(place, fns)


def _items(config) -> tuple[list, dict]:
    """[(idx, load_image, label)] for every `skip`-th image, positions 0 to `max`, in the
    official order (ImageNet: ImageFolder order), and {idx: image name}; images load lazily.

    Loading is deferred (the runner calls `load_image()` only for indices it certifies), so
    a resumed run does not decode what it has already logged.
    """
    from dmae_jax.data import augment, datasets

    source = datasets.load_source(config.data.dataset, config.data.split,
                                  data_dir=config.data.data_dir,
                                  image_size=config.data.image_size)
    subset = datasets.official_subset(len(source), config.data.dataset, config.data.split,
                                      skip=config.skip, stop=config.max,
                                      data_dir=config.data.data_dir)

    def loader(idx):
        return lambda: augment.certification_input(  # ImageNet: Resize(256) + CenterCrop(224)
            source[idx]["image"], config.data.dataset, config.data.image_size)

    labels = _labels(source, [idx for idx, _ in subset])
    return [(idx, loader(idx), label) for idx, label in labels], dict(subset)


def _labels(source, indices) -> list[tuple[int, int]]:
    if hasattr(source, "labels"):  # in-memory digits
        return [(i, int(source.labels[i])) for i in indices]
    return [(i, int(source[i]["label"])) for i in indices]


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Certifies the configured subset; writes `workdir/<log_name>` and prints the report."""
    from dmae_jax import report, storage
    from dmae_jax.data import datasets
    from dmae_jax.smoothing import runner
    from dmae_jax.smoothing.certify import LOG_COLUMNS, make_certify_one
    from dmae_jax.tasks import identity

    config = config_lib.resolve(config)
    storage.makedirs(workdir)
    log_path = os.path.join(workdir, config.log_name)
    if jax.process_index() == 0:
        config_lib.save_resolved(config, log_path + ".config.json")
    identity.check_log(config, log_path)
    num_classes = datasets.num_classes(config.data.dataset)
    dtype = None if config.compute_dtype == "float32" else jax.numpy.bfloat16
    rng = jax.random.key(config.seed)
    from dmae_jax.smoothing import sequential
    from dmae_jax.smoothing.settings import Settings

    sigmas = config.sigma if config.task == "certify" else C.sigmas(config, "sigmas")
    settings = Settings(sigma=sigmas, n0=config.n0, n=config.n, alpha=config.alpha,
                        batch_size=config.batch_size, num_classes=num_classes,
                        compute_dtype=dtype, noise=config.noise)
    seq_settings = dataclasses.replace(settings, n=config.n_max or int(1.5 * config.n))
    schedule = sequential.Schedule(radii=tuple(config.radii) or sequential.DEFAULT_RADII)

    if config.task == "certify":
        classifier_fn, _ = load_classifier(config.checkpoint, dtype=config.compute_dtype)
        logits_fn = place_once(_logits_fns_for(config, [classifier_fn], [config.sigma]))[0]
        certify_one = make_certify_one(logits_fn, settings, rng=rng,
                                       early_abstain=config.early_abstain)
        if config.mode == "sequential":
            certify_one = sequential.make_certify_one(logits_fn, seq_settings, rng=rng,
                                                      schedule=schedule)
        columns = LOG_COLUMNS
        after = sequential.SEQUENTIAL_COLUMNS if config.mode == "sequential" else ()
    else:
        from dmae_jax.smoothing import cascade

        paths = list(config.get("checkpoints") or []) or [config.checkpoint] * len(sigmas)
        loaded = {p: load_classifier(p, dtype=config.compute_dtype)[0] for p in set(paths)}
        fns = place_once(_logits_fns_for(config, [loaded[p] for p in paths], sigmas))
        certify_one = cascade.make_certify_one(fns, settings, rng=rng, p0=config.p0,
                                               alpha_split=config.alpha_split)
        if config.mode == "sequential":
            certify_one = sequential.make_cascade_certify_one(
                fns, seq_settings, rng=rng, p0=config.p0,
                schedule=dataclasses.replace(sequential.CASCADE_SCHEDULE,
                                             radii=schedule.radii))
        columns = cascade.CASCADE_COLUMNS
        # sequential rows also carry the deciding stage's bound at its stopping look
        after = sequential.CASCADE_EXTRA_COLUMNS if config.mode == "sequential" else ()

    items, names = _items(config)  # the "image" column names each row's file (ImageNet)
    named_one = lambda idx, image, label: {**certify_one(idx, image, label),  # noqa: E731
                                           "image": names[idx]}
    runner.run_certification(
        items, named_one, log_path=log_path, extra_columns=(*columns, "image", *after),
        process_index=jax.process_index(), process_count=jax.process_count())
    if jax.process_index() == 0 and storage.exists(log_path):
        rows = report.load(log_path)
        table = report.markdown_table([rows], [config.log_name])
        logging.info("certification report:\n%s", table)
        print(table, flush=True)
        from dmae_jax import metrics

        metrics.write_certification(workdir, config.log_name, rows, table=table)
