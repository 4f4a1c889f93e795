"""The `certify` and `cascade` tasks: certify a data set with an exported classifier.

`certify`: Cohen et al.'s CERTIFY at one sigma, one log row per image (Cohen et al.'s TSV
columns idx, label, predict, radius, correct, time, then ours), resumable. `cascade`: the
multi-scale cascade of Jeong & Shin over several sigmas, either with one fine-tuned
classifier per sigma (`config.checkpoints`) or with one classifier behind a denoiser for
every sigma (`config.checkpoint` + `config.denoiser`).

  python -m dmae_jax.main --config=configs/certify.py:sigma=0.5 --workdir=runs/cert \
      --config.checkpoint=runs/ft_050/export

The run path (`dmae_jax.tasks.execute`) locks the log, calls `check` (the log's identity
and subset), records the identity and the config next to the log, then calls `run`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections
from absl import logging
from flax import nnx

from dmae_jax import checks, report, storage
from dmae_jax.data import augment, datasets
from dmae_jax.diffusion import denoise, loading
from dmae_jax.models import classifier
from dmae_jax.smoothing import cascade, runner, sequential
from dmae_jax.smoothing.certify import LOG_COLUMNS, make_certify_one
from dmae_jax.smoothing.sampling import place_replicated
from dmae_jax.smoothing.settings import Settings
from dmae_jax.tasks import identity


def check(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The identity record a run of `config` will write; refuses a resume (IdentityError)
    under another identity or with logged images outside this run's subset. Writes nothing.
    """
    path = os.path.join(workdir, config.log_name)
    record = identity.check(config, path)
    logged = runner.logged_indices(path)
    if logged:
        runner.check_subset(path, logged, {idx for idx, _ in _subset(config, _source(config))})
    return record


def load_classifier(path: str, *, field: str = "config.checkpoint", dtype: str | None = None):
    """A jit-friendly logits_fn ([B,H,W,C] in [0,1] -> [B,K]) and the export's meta.

    `dtype` (float32 | bfloat16) sets the compute dtype of the blocks, whatever the
    classifier was trained with (the papers certified under fp16 autocast).
    """
    parts, meta = classifier.from_export(path, field=field)
    if dtype is not None and dtype != meta["model"].get("dtype"):
        model = classifier.create_classifier({**meta["model"], "dtype": dtype},
                                             meta["num_classes"], rngs=nnx.Rngs(0))
        parts = type(parts).split(model).with_params(parts.params, where=f"{field} = {path!r}")
    architecture = json.dumps([meta["model"], meta["num_classes"], dtype], sort_keys=True)
    if architecture not in _APPLY:
        _APPLY[architecture] = functools.partial(_apply, parts)
    return (jax.tree_util.Partial(_APPLY[architecture],
                                  jax.tree.map(jax.numpy.asarray, parts.params)), meta)


# One apply function per architecture. The sampler compiles its step once per logits_fn
# structure, which holds the function: classifiers that share it (the pipeline's three
# sigmas and its cascade) share one compiled step instead of compiling one each.
_APPLY: dict[str, functools.partial] = {}


def _apply(parts, params, images):
    return parts.bind(params)(images)


def _logits_fns_for(config, classifier_fns, sigmas) -> list:
    """One logits_fn per sigma: the classifier, behind the denoiser when one is configured.

    The denoiser export is read once for all sigmas (`load_denoise_fns` shares its weights),
    so a cascade costs the memory of one UNet, not one per sigma.
    """
    if not config.get("denoiser"):
        return list(classifier_fns)
    denoise_fns = loading.load_denoise_fns(config.denoiser, config.denoiser_kind, sigmas)
    return [denoise.denoise_then_classify(d, c)
            for d, c in zip(denoise_fns, classifier_fns, strict=True)]


def place_once(fns: list) -> list:
    """`place_replicated` over pytree logits_fns; an array several of them share is copied once.

    The cascade's logits_fns share the denoiser's (and possibly a classifier's) arrays, so
    the devices hold one copy of each model, however many sigmas use it.
    """
    placed: dict[int, jax.Array] = {}

    def place(leaf):
        if id(leaf) not in placed:
            placed[id(leaf)] = place_replicated(leaf)
        return placed[id(leaf)]

    return jax.tree.map(place, fns)


def _subset(config, source) -> list[tuple[int, str]]:
    """[(record index, image name)] of every `skip`-th image of `source`, positions 0 to
    `max`, in the official order (ImageNet: ImageFolder order)."""
    return datasets.official_subset(len(source), config.data.dataset, config.data.split,
                                    skip=config.skip, stop=config.max,
                                    data_dir=config.data.data_dir)


def _source(config):
    return datasets.load_source(config.data.dataset, config.data.split,
                                data_dir=config.data.data_dir, image_size=config.data.image_size)


def _items(config) -> tuple[list, dict]:
    """[(idx, load_image, label)] of `_subset`'s images and {idx: image name}; images load
    lazily.

    Loading is deferred (the runner calls `load_image()` only for indices it certifies), so
    a resumed run does not decode what it has already logged.
    """
    source = _source(config)
    subset = _subset(config, source)

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
    """Certifies the configured subset into `workdir/<log_name>` and prints the report."""
    path = os.path.join(workdir, config.log_name)
    num_classes = datasets.num_classes(config.data.dataset)
    dtype = None if config.compute_dtype == "float32" else jax.numpy.bfloat16
    rng = jax.random.key(config.seed)
    sigmas = config.sigma if config.task == "certify" else checks.sigmas(config, "sigmas")
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
        items, named_one, log_path=path, extra_columns=(*columns, "image", *after),
        process_index=jax.process_index(), process_count=jax.process_count())
    if jax.process_index() == 0 and storage.exists(path):
        rows = report.load(path)
        table = report.markdown_table([rows], [config.log_name])
        logging.info("certification report:\n%s", table)
        print(table, flush=True)
        report.write_tensorboard(workdir, config.log_name, rows, table=table)
