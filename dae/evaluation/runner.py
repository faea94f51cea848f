"""One runner for every evaluation protocol: several backbones, the same protocols and splits, one results table.

Each protocol is a function of a :class:`BackboneContext` that returns result rows; :data:`PROTOCOLS` maps
protocol names to them, in the order they run (whatever order they are asked in):

- ``knn``: weighted k-NN (:func:`~dae.evaluation.knn.run_knn`); k chosen on validation with the training split as
  memory, then the test split is scored with training + validation as memory.
- ``linear_probe``: :func:`~dae.evaluation.linear_probe.run_linear_probe` (grid on validation, retrain on
  training + validation, test once); ROC curves of its test scores.
- ``retrieval``: test images query the training images by CLS cosine similarity
  (:func:`~dae.evaluation.retrieval.run_retrieval`); precision@k and a picture of the neighbours.
- ``finetune``: a copy of the backbone and a linear head trained end to end
  (:func:`~dae.evaluation.finetune.run_finetune`; ``fine_tune: false`` trains the head only).
- ``seg_probe``: a segmentation head on the frozen patch grid (:func:`~dae.evaluation.seg_probe.run_seg_probe`);
  pictures of test predictions.

Every hyper-parameter (k, the probe setting, the epoch, the learning rate) is chosen on the validation split and
the test split is scored once. The test split may be any labelled list (:func:`~dae.data.load_test_set`,
:func:`evaluation_lists`); its results go to their own folder, :func:`results_dir`
(``<output_dir>/evaluation/<test set name>/``), so that scoring another test set never overwrites them:

- ``<output_dir>/features/<backbone>/{training,validation}.pt``: what the heads are trained and chosen on, shared
  by the test sets;
- ``<output_dir>/evaluation/<test set>/``: ``results.{csv,json,md}`` (``results.md`` starts with what was scored),
  ``features/<backbone>/test.pt``, ``pictures/`` (PNG) and ``tensorboard/``.

The classification protocols use features extracted once per backbone and split when first needed; for them a
picture shows the first three principal components of the patch features of a few test images.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from dae.data.datalist import read_class_names
from dae.data.loaders import load_splits
from dae.data.test_sets import TestSet
from dae.errors import DataError
from dae.evaluation.baselines import gain_table, with_random_baselines
from dae.evaluation.features import AdaptedExtractor, build_extractor, extract_features, unpack_batch
from dae.evaluation.featureset import FeatureSet
from dae.evaluation.finetune import ProbeFeatures, run_finetune
from dae.evaluation.knn import run_knn
from dae.evaluation.linear_probe import LinearProbeConfig, run_linear_probe
from dae.evaluation.report import format_table, roc_figure, save_figure, save_retrieval_figure, write_results
from dae.evaluation.retrieval import run_retrieval
from dae.evaluation.seg_probe import first_samples, run_seg_probe, seg_probe_picture
from dae.utils.config import resolve_flag
from dae.utils.pictures import pca_picture, save_picture
from dae.utils.precision import amp_dtype
from dae.utils.tensors import plain_tensor

__all__ = [
    "PROTOCOLS",
    "SPLITS",
    "BackboneContext",
    "evaluate_backbones",
    "evaluation_lists",
    "results_dir",
]

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")


def results_dir(output_dir: str | Path, test_set: TestSet | None = None) -> Path:
    """``<output_dir>/evaluation/<test set name>``, the folder of one test set's results (name ``test`` for None)."""
    return Path(output_dir) / "evaluation" / (test_set.name if test_set is not None else "test")


def evaluation_lists(
    datalist: str | Path,
    dataset_dir: str | Path | None,
    test_set: TestSet,
    default_modality: str | None = None,
    require_label: bool | str = True,
) -> dict[str, list[dict]]:
    """The ``training`` and ``validation`` lists of ``datalist`` and the entries of ``test_set`` as ``test``.

    The heads are trained and chosen on ``datalist``; the scored list may come from any file, but its class map
    must be the same, or its labels would be read as other classes. Scored images that are also in the training
    or validation list (e.g. the ``validation`` fallback of ``datalist`` itself) are counted in a warning: the
    heads were trained or chosen on them, so their scores are optimistic.

    Args:
        datalist: the JSON datalist of the training and validation lists; its ``labels`` map names the classes.
        dataset_dir: folder that its relative paths are joined to.
        test_set: the scored list (:func:`~dae.data.load_test_set`).
        default_modality: modality of entries without one.
        require_label: the label every entry must have, as for :func:`~dae.data.load_datalist`.

    Returns:
        ``{"training": entries, "validation": entries, "test": entries}``, loaded and validated.

    Raises:
        DataError: the ``labels`` maps of ``datalist`` and the test set's datalist differ (naming both files).
        DatalistError: a file, list or entry cannot be used.
    """
    classes, test_classes = read_class_names(datalist), read_class_names(test_set.datalist)
    if classes != test_classes:
        raise DataError(
            f"the class map of the test datalist {test_set.datalist} {dict(enumerate(test_classes))} differs from "
            f"that of the datalist {datalist} {dict(enumerate(classes))} that the heads are trained on",
            advice="give the test datalist the same 'labels' map (class index -> name) as --datalist",
        )
    lists = load_splits(datalist, dataset_dir, SPLITS[:2], default_modality, require_label)
    seen = {os.path.abspath(entry["image"]) for entries in lists.values() for entry in entries}
    shared = sum(os.path.abspath(entry["image"]) in seen for entry in test_set.entries)
    if shared:
        logger.warning(
            "%d of the %d images of test set %s are in the training or validation list of %s: the heads were "
            "trained or chosen on them, so its scores are optimistic",
            shared,
            len(test_set.entries),
            test_set.name,
            datalist,
        )
    return {**lists, "test": test_set.entries}


@dataclass
class BackboneContext:
    """What a protocol gets for one backbone.

    Attributes:
        name: the backbone's name (rows, file names, TensorBoard tags).
        extractor: its feature extractor behind its input adapter, on ``device``, in eval mode.
        loaders: ``training``, ``validation`` and ``test`` loaders.
        class_names: the class names in label order.
        output_dir: the run's output folder (features of the training and validation splits).
        results_dir: the test set's folder (its features, pictures and results; :func:`results_dir`).
        writer: the test set's TensorBoard writer.
        device: where features are computed and heads trained.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` for the frozen extractor.
        seed: seed of the heads and the bootstrap.
        n_boot: bootstrap resamples of the test intervals.
        pictures: test images shown in pictures (0: none).
        image_key / label_key: batch keys.
        options: the running protocol's options.
        cache: the feature sets extracted so far, by split (shared by the backbone's protocols).
    """

    name: str
    extractor: AdaptedExtractor
    loaders: Mapping[str, Iterable[Any]]
    class_names: list[str]
    output_dir: Path
    results_dir: Path
    writer: SummaryWriter
    device: torch.device
    amp: str = "none"
    seed: int = 0
    n_boot: int = 1000
    pictures: int = 4
    image_key: str = "image"
    label_key: str = "label"
    options: Mapping[str, Any] = field(default_factory=dict)
    cache: dict[str, FeatureSet] = field(default_factory=dict)

    def features(self, split: str) -> FeatureSet:
        """The features of ``split``, extracted and saved on first use.

        They are saved to ``features/<name>/<split>.pt`` in ``results_dir`` for ``test``, else in ``output_dir``.
        """
        if split not in self.cache:
            features = extract_features(
                self.extractor,
                self.loaders[split],
                image_key=self.image_key,
                label_key=self.label_key,
                class_names=self.class_names,
                device=self.device,
                amp=self.amp,
            )
            folder = self.results_dir if split == "test" else self.output_dir
            path = features.save(folder / "features" / self.name / f"{split}.pt")
            logger.info("%s: %d %s features (dim %d) saved to %s", self.name, len(features), split, features.dim, path)
            self.cache[split] = features
        return self.cache[split]

    def first_images(self, split: str, n: int) -> torch.Tensor:
        """The first ``n`` images of ``split`` as float32 on the CPU."""
        images: list[torch.Tensor] = []
        for batch in self.loaders[split]:
            images.append(plain_tensor(unpack_batch(batch, self.image_key, None)[0]).float())
            if sum(len(i) for i in images) >= n:
                break
        return torch.cat(images)[:n]

    def picture_path(self, what: str) -> Path:
        """``pictures/<name>_<what>.png`` in the test set's folder."""
        return self.results_dir / "pictures" / f"{self.name}_{what}.png"


def _knn(ctx: BackboneContext) -> list[dict[str, Any]]:
    train, val, test = (ctx.features(split) for split in SPLITS)
    return run_knn(train, val, test, **{"n_boot": ctx.n_boot, "seed": ctx.seed, **ctx.options})


def _linear_probe(ctx: BackboneContext) -> list[dict[str, Any]]:
    config = LinearProbeConfig(**{"n_boot": ctx.n_boot, "seed": ctx.seed, "device": str(ctx.device), **ctx.options})
    result = run_linear_probe(*(ctx.features(split) for split in SPLITS), config)
    figure = roc_figure(result.test_scores, result.test_labels, result.class_names, title=ctx.name)
    ctx.writer.add_figure(f"{ctx.name}/linear_probe_roc", figure)
    save_figure(figure, ctx.picture_path("linear_probe_roc"))
    return result.rows()


def _retrieval(ctx: BackboneContext) -> list[dict[str, Any]]:
    gallery, query = ctx.features("training"), ctx.features("test")
    rows, indices, sims = run_retrieval(gallery, query, **ctx.options)
    if rows and ctx.pictures > 0:
        shown = indices[: ctx.pictures, : min(5, indices.shape[1])]
        dataset = ctx.loaders["training"].dataset
        neighbours = [plain_tensor(dataset[i][ctx.image_key]).float() for i in shown.flatten().tolist()]
        save_retrieval_figure(
            ctx.picture_path("retrieval"),
            ctx.first_images("test", ctx.pictures),
            torch.stack(neighbours),
            torch.arange(shown.numel()).reshape(shown.shape),
            sims[: ctx.pictures, : shown.shape[1]],
            query_labels=query.labels[: ctx.pictures],
            gallery_labels=gallery.labels[shown.flatten()],
            class_names=gallery.class_names,
            max_queries=ctx.pictures,
        )
    return rows


def _finetune(ctx: BackboneContext) -> list[dict[str, Any]]:
    options = {"n_boot": ctx.n_boot, "seed": ctx.seed, "device": ctx.device, **ctx.options}
    n_blocks, avgpool = options.pop("n_blocks", 1), options.pop("avgpool", False)
    train = ctx.features("training")
    # A copy, so that the protocols after this one (and the pictures) see the backbone as it was given.
    model = ProbeFeatures(copy.deepcopy(ctx.extractor), n_blocks=n_blocks, avgpool=avgpool)
    result = run_finetune(
        model,
        *(ctx.loaders[split] for split in SPLITS),
        num_classes=train.num_classes,
        multilabel=train.is_multilabel,
        class_names=train.class_names,
        feature_dim=model.out_dim,
        image_key=ctx.image_key,
        label_key=ctx.label_key,
        **options,
    )
    return result.rows()


def _seg_probe(ctx: BackboneContext) -> list[dict[str, Any]]:
    num_classes = len(ctx.class_names)
    keys = {"image_key": ctx.image_key, "label_key": ctx.label_key}
    options = {"device": ctx.device, "amp": ctx.amp, "seed": ctx.seed, **ctx.options}
    loaders = (ctx.loaders[split] for split in SPLITS)
    result = run_seg_probe(ctx.extractor, *loaders, num_classes, class_names=ctx.class_names, **keys, **options)
    for epoch, loss in enumerate(result.train_losses, start=1):
        ctx.writer.add_scalar(f"{ctx.name}/seg_probe_train_loss", loss, epoch)
    if ctx.pictures > 0:
        images, labels = first_samples(ctx.loaders["test"], ctx.pictures, num_classes=num_classes, **keys)
        picture = seg_probe_picture(ctx.extractor, result, images, labels, ctx.class_names, ctx.device, ctx.amp)
        ctx.writer.add_image(f"{ctx.name}/seg_probe_test", picture)
        save_picture(picture, ctx.picture_path("seg_probe"))
    return result.rows()


#: protocol name -> protocol, in running order
PROTOCOLS: dict[str, Callable[[BackboneContext], list[dict[str, Any]]]] = {
    "knn": _knn,
    "linear_probe": _linear_probe,
    "retrieval": _retrieval,
    "finetune": _finetune,
    "seg_probe": _seg_probe,
}
#: the protocols that classify images, after which the patch features are pictured
CLASSIFICATION_PROTOCOLS = ("knn", "linear_probe", "retrieval", "finetune")


@torch.no_grad()
def _pca_picture(ctx: BackboneContext) -> None:
    images = ctx.first_images("test", ctx.pictures).to(ctx.device)
    picture = pca_picture(images, ctx.extractor.eval()(images)["patch_grid"])
    ctx.writer.add_image(f"{ctx.name}/patch_features_pca", picture)
    save_picture(picture, ctx.picture_path("patch_pca"))


def evaluate_backbones(
    backbones: Mapping[str, Mapping[str, Any]],
    loaders: Mapping[str, Iterable[Any]],
    output_dir: str | Path,
    class_names: Sequence[str],
    protocols: Sequence[str] = ("knn", "linear_probe", "retrieval"),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    image_key: str = "image",
    label_key: str = "label",
    device: str | torch.device = "cpu",
    amp: str = "none",
    pictures: int = 4,
    test_set: TestSet | None = None,
    compare_random: bool = False,
) -> list[dict[str, Any]]:
    """Run ``protocols`` for every backbone and write ``results.{csv,json,md}`` and pictures of the test set.

    The training and validation features go to ``<output_dir>/features/``; everything that depends on the test
    split (its features, the pictures, TensorBoard and the results) goes to :func:`results_dir`,
    ``<output_dir>/evaluation/<test set name>/``. Every row holds the test set's name (``test_set``);
    ``results.md`` starts with the scored list and the test set's ``note``, which is also logged.

    Args:
        backbones: name -> spec of :func:`~dae.evaluation.features.build_extractor` (backbone keys, extractor
            option, ``input_size`` / ``mean`` / ``std``).
        loaders: ``training``, ``validation`` and ``test`` loaders of ``[B, 1 or 3, H, W]`` images in [0, 1] with
            integer (or multi-hot) labels, or integer label maps ``[B, 1, H, W]`` for ``seg_probe``; not shuffled.
        output_dir: the run's folder (above).
        class_names: the class names in label order (background first for ``seg_probe``).
        protocols: names from :data:`PROTOCOLS`; they run in that mapping's order.
        options: protocol name -> its options: ``knn``: ``ks``, ``temperature`` (:func:`~dae.evaluation.knn.run_knn`);
            ``linear_probe``: :class:`~dae.evaluation.linear_probe.LinearProbeConfig` fields; ``retrieval``: ``ks``;
            ``finetune``: :func:`~dae.evaluation.finetune.run_finetune` options (``fine_tune``, ``head_lr``,
            ``backbone_lr``, ``epochs``, ...) plus ``n_blocks`` and ``avgpool``; ``seg_probe``:
            :func:`~dae.evaluation.seg_probe.run_seg_probe` options (``decoder``, ``learning_rates``, ``epochs``,
            ``optimizer``, ``weight_decay``, ...). An option a protocol shares with the arguments below (``n_boot``,
            ``seed``, ``device``, ``amp``) overrides the argument.
        n_boot: bootstrap resamples of the test intervals.
        seed: seed of the heads and the bootstrap.
        image_key / label_key: batch keys.
        device: where features are computed and heads trained.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` for the frozen extractors.
        pictures: test images shown in the pictures (0: none).
        test_set: what ``loaders["test"]`` holds (:func:`~dae.data.load_test_set`): its name, file, list and
            note; None: the name ``test``, nothing else recorded.
        compare_random: also evaluate every backbone that loads a checkpoint at random initialisation
            (:func:`~dae.evaluation.baselines.with_random_baselines`, seeded with ``seed``), and add the table of
            pretrained against random init (:func:`~dae.evaluation.baselines.gain_table`) to ``results.md`` and the
            printout.

    Returns:
        The result rows (``backbone``, ``protocol``, ``setting``, ``metric``, ``value``, ``low``, ``high``, ...).

    Raises:
        ValueError: for no protocol, an unknown protocol (in ``protocols`` or ``options``), a missing split or an
            unknown ``amp``; protocol errors propagate.
    """
    options = dict(options or {})
    unknown = sorted({*protocols, *options} - set(PROTOCOLS))
    if unknown or not protocols:
        raise ValueError(f"unknown protocols {unknown} or none asked for; choose from {list(PROTOCOLS)}")
    missing = [split for split in SPLITS if split not in loaders]
    if missing:
        raise ValueError(f"evaluation needs the {list(SPLITS)} splits; missing {missing}")
    amp_dtype(amp)  # an unknown value fails here rather than after the first backbone
    out, scored = Path(output_dir), results_dir(output_dir, test_set)
    (scored / "pictures").mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    rows: list[dict[str, Any]] = []
    writer = SummaryWriter(str(scored / "tensorboard"))
    if resolve_flag(compare_random, "compare_random"):
        backbones = with_random_baselines(backbones)
    try:
        for name, spec in backbones.items():
            torch.manual_seed(seed)  # a random-init backbone is the same in every run
            extractor = build_extractor(spec).to(device)
            logger.info("backbone %s: %s", name, dict(spec))
            context = BackboneContext(
                name=name,
                extractor=extractor,
                loaders=loaders,
                class_names=list(class_names),
                output_dir=out,
                results_dir=scored,
                writer=writer,
                device=device,
                amp=amp,
                seed=seed,
                n_boot=n_boot,
                pictures=pictures,
                image_key=image_key,
                label_key=label_key,
            )
            for protocol, run in PROTOCOLS.items():
                if protocol in protocols:
                    found = run(replace(context, options=options.get(protocol, {})))
                    rows += [{"backbone": name, **row, "test_set": scored.name} for row in found]
            classified = any(protocol in CLASSIFICATION_PROTOCOLS for protocol in protocols)
            if classified and extractor.has_patch_tokens and pictures > 0:
                _pca_picture(context)
    finally:
        writer.close()
    gains = gain_table(rows)
    paths = write_results(rows, scored, "results", preamble=_describe(test_set, scored.name), appendix=gains)
    logger.info("results written to %s", ", ".join(str(p) for p in paths.values()))
    print(format_table(rows))
    if gains:
        print(f"\n{gains}")
    if test_set is not None and test_set.note:
        logger.warning("test set %s: %s", test_set.name, test_set.note)
    return rows


def _describe(test_set: TestSet | None, name: str) -> str:
    """The Markdown lines above the results table: what was scored."""
    if test_set is None:
        return f"Test set `{name}`."
    scored = f"list `{test_set.split}` of `{test_set.datalist}`, {len(test_set.entries)} images"
    text = f"Test set `{test_set.name}`: {scored}."
    return f"{text}\n\nNote: {test_set.note}." if test_set.note else text
