"""Evaluate several backbones with the same protocols on the same splits, and write one results table.

For each backbone: extract features of the ``training``, ``validation`` and ``test`` splits once (saved under
``features/<backbone>/`` for reuse), then run the chosen protocols. Every hyper-parameter (k of the k-NN, the
linear-probe setting, the fine-tuning epoch) is chosen on the validation split; the test split is scored once,
with a bootstrap interval.

- ``knn``: weighted k-NN; k chosen on validation with the training split as memory, then the test split is
  scored with training + validation as memory.
- ``linear_probe``: :func:`~dae.evaluation.linear_probe.run_linear_probe` (grid on validation, retrain on
  training + validation, test once); ROC curves of its test scores.
- ``retrieval``: test images query the training images by CLS cosine similarity; precision@k and a picture.
- ``finetune``: backbone and a linear head trained end to end (``fine_tune: false`` trains the head only).

Pictures (PNG files under ``pictures/`` and TensorBoard): ROC curves, retrieval neighbours, and the first three
principal components of the patch features of a few test images as colour images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from dae.evaluation.features import ProbeFeatures, build_extractor, extract_features, pca_rgb
from dae.evaluation.featureset import FeatureSet
from dae.evaluation.knn import knn_evaluate
from dae.evaluation.linear_probe import (
    LinearProbeConfig,
    resolve_finetune_flag,
    resolve_metric,
    run_finetune,
    run_linear_probe,
)
from dae.evaluation.report import format_table, roc_figure, save_figure, write_results
from dae.evaluation.retrieval import precision_at_k, retrieve, save_retrieval_figure
from dae.utils.tensors import min_max

__all__ = ["PROTOCOLS", "BackboneInput", "adapted_extractor", "evaluate_backbones"]

logger = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear_probe", "retrieval", "finetune")
SPLITS = ("training", "validation", "test")
#: keys of a backbone spec read here (the rest goes to :func:`~dae.evaluation.features.build_extractor`)
INPUT_KEYS = ("input_size", "mean", "std")


class BackboneInput(nn.Module):
    """Adapt the loaders' images (``[B, 1 or 3, H, W]`` in [0, 1]) to what one backbone expects.

    Resizes to ``input_size`` (bicubic, antialiased) when given, repeats a grey channel to ``channels``, and
    normalises with ``mean`` / ``std`` when given (e.g. RAD-DINO: 518, 0.5307, 0.2583).
    """

    def __init__(
        self, channels: int, input_size: int | None = None, mean: float | None = None, std: float | None = None
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.channels, self.input_size, self.mean, self.std = channels, input_size, mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", antialias=True, align_corners=False)
        if x.shape[1] == 1 and self.channels > 1:
            x = x.expand(-1, self.channels, -1, -1)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


class _Adapted(nn.Module):
    """A module applied after a :class:`BackboneInput`; keeps the wrapped module's attributes reachable."""

    def __init__(self, adapt: BackboneInput, module: nn.Module) -> None:
        super().__init__()
        self.adapt, self.module = adapt, module

    def forward(self, images: torch.Tensor) -> Any:
        return self.module(self.adapt(images))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def _input_channels(extractor: nn.Module) -> int:
    for module in extractor.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def adapted_extractor(spec: Mapping[str, Any]) -> _Adapted:
    """The feature extractor of a backbone spec behind the input adapter its ``input_size``/``mean``/``std`` ask for.

    The result is in eval mode; its ``adapt`` is the :class:`BackboneInput` and its ``module`` the extractor.
    """
    extractor = build_extractor({k: v for k, v in spec.items() if k not in INPUT_KEYS})
    adapt = BackboneInput(_input_channels(extractor), *(spec.get(k) for k in INPUT_KEYS))
    return _Adapted(adapt, extractor).eval()


def _features(
    name: str, extractor: nn.Module, loaders: Mapping[str, DataLoader], class_names: Sequence[str], out: Path, **kw
) -> dict[str, FeatureSet]:
    sets = {}
    for split in SPLITS:
        sets[split] = extract_features(extractor, loaders[split], class_names=class_names, **kw)
        path = out / "features" / name / f"{split}.pt"
        sets[split].save(path)
        logger.info("%s: %d %s features (dim %d) saved to %s", name, len(sets[split]), split, sets[split].dim, path)
    return sets


def _knn(sets: Mapping[str, FeatureSet], ks: Sequence[int], temperature: float, n_boot: int, seed: int) -> list:
    train, val, test = (sets[s] for s in SPLITS)
    metric = resolve_metric("auto", train.is_multilabel, max(train.num_classes, test.num_classes))
    val_rows = [r for r in knn_evaluate(train, val, ks, temperature) if r["metric"] == metric]
    best = max(val_rows, key=lambda r: (r["value"], -r["k"]))
    logger.info(
        "k-NN on validation (%s): %s; chosen k=%d", metric, {r["k"]: round(r["value"], 4) for r in val_rows}, best["k"]
    )
    rows = knn_evaluate(train.concat(val), test, [best["k"]], temperature, n_boot=n_boot, seed=seed)
    for row in rows:
        row["val_value"] = best["value"]
    return rows


def _retrieval(
    sets: Mapping[str, FeatureSet], loaders: Mapping[str, DataLoader], ks: Sequence[int], image_key: str, path: Path
) -> list[dict[str, Any]]:
    gallery, query = sets["training"], sets["test"]
    usable = [k for k in ks if k <= len(gallery)]
    if len(usable) < len(ks):
        logger.warning("retrieval: precision@k for k > %d (the gallery size) skipped", len(gallery))
    if not usable:
        return []
    ks = usable
    indices, sims = retrieve(query.cls, gallery.cls, max(ks))
    scores = precision_at_k(query.labels, gallery.labels, indices, ks)
    rows = [{"protocol": "retrieval", "setting": "test->training", "metric": k, "value": v} for k, v in scores.items()]
    shown = 4
    queries = _first_images(loaders["test"], shown, image_key)
    needed = indices[:shown, : min(5, indices.shape[1])]
    picked = _dataset_images(loaders["training"], needed.flatten().tolist(), image_key)
    local = torch.arange(needed.numel()).reshape(needed.shape)
    save_retrieval_figure(
        path,
        queries,
        picked,
        local,
        sims[:shown, : needed.shape[1]],
        query_labels=query.labels[:shown],
        gallery_labels=gallery.labels[needed.flatten()],
        class_names=gallery.class_names,
        max_queries=shown,
    )
    return rows


def _first_images(loader: DataLoader, n: int, image_key: str) -> torch.Tensor:
    images = []
    for batch in loader:
        images.append(torch.as_tensor(batch[image_key]).float())
        if sum(len(i) for i in images) >= n:
            break
    return torch.cat(images)[:n]


def _dataset_images(loader: DataLoader, indices: Sequence[int], image_key: str) -> torch.Tensor:
    return torch.stack([torch.as_tensor(loader.dataset[i][image_key]).float() for i in indices])


@torch.no_grad()
def _pca_picture(extractor: nn.Module, images: torch.Tensor) -> torch.Tensor:
    grid = extractor(images)["patch_grid"].float()
    colours = F.interpolate(pca_rgb(grid), size=images.shape[-2:], mode="nearest")
    grey = images.float().mean(1, keepdim=True).expand(-1, 3, -1, -1)
    grey = min_max(grey)
    tiles = torch.stack([grey, colours], 1).flatten(0, 1)
    return make_grid(tiles, nrow=2, padding=2, pad_value=1.0)


def _save_picture(picture: torch.Tensor, path: str | Path) -> Path:
    """Save a ``(3, H, W)`` picture in [0, 1] as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (picture.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)
    return path


def evaluate_backbones(
    backbones: Mapping[str, Mapping[str, Any]],
    loaders: Mapping[str, DataLoader],
    output_dir: str | Path,
    class_names: Sequence[str],
    protocols: Sequence[str] = ("knn", "linear_probe", "retrieval"),
    knn_ks: Sequence[int] = (10, 20, 100, 200),
    knn_temperature: float = 0.07,
    linear: LinearProbeConfig | None = None,
    retrieval_ks: Sequence[int] = (1, 5, 10),
    finetune: Mapping[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    image_key: str = "image",
    label_key: str = "label",
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    pictures: int = 4,
) -> list[dict[str, Any]]:
    """Run ``protocols`` for every backbone and write ``results.{csv,json,md}`` and pictures to ``output_dir``.

    Args:
        backbones: name -> extractor spec (see :func:`~dae.evaluation.features.build_extractor`), plus optional
            ``input_size``, ``mean`` and ``std`` (see :class:`BackboneInput`).
        loaders: ``training``, ``validation`` and ``test`` loaders of ``[B, 1 or 3, H, W]`` images in [0, 1] with
            integer (or multi-hot) labels; not shuffled.
        output_dir: where results, features and pictures go.
        class_names: the class names in label order.
        protocols: a subset of :data:`PROTOCOLS`.
        knn_ks: the k values tried on validation.
        knn_temperature: the k-NN vote temperature.
        linear: the linear-probe grid and training settings (``n_boot`` and ``seed`` are taken from here).
        retrieval_ks: the k of precision@k.
        finetune: keyword arguments of :func:`~dae.evaluation.linear_probe.run_finetune` (``fine_tune``,
            ``head_lr``, ``backbone_lr``, ``epochs``, ...) plus ``n_blocks`` and ``avgpool``.
        n_boot: bootstrap resamples of the test intervals.
        seed: seed of the probes and the bootstrap.
        image_key / label_key: batch keys.
        device: where features are computed and probes trained.
        amp_dtype: autocast dtype for feature extraction, or None.
        pictures: test images shown in the PCA and retrieval pictures.

    Returns:
        The result rows (``backbone``, ``protocol``, ``setting``, ``metric``, ``value``, ``low``, ``high``, ...).
    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {list(protocols)}")
    missing = [s for s in SPLITS if s not in loaders]
    if missing:
        raise ValueError(f"evaluation needs the {list(SPLITS)} splits; missing {missing}")
    out = Path(output_dir)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    linear = linear or LinearProbeConfig(n_boot=n_boot, seed=seed, device=str(device))
    rows: list[dict[str, Any]] = []
    writer = SummaryWriter(str(out / "tensorboard"))
    try:
        for name, full_spec in backbones.items():
            model = adapted_extractor(full_spec).to(device)
            logger.info("backbone %s: %s", name, dict(full_spec))
            kw = {"image_key": image_key, "label_key": label_key, "device": device, "amp_dtype": amp_dtype}
            sets = _features(name, model, loaders, class_names, out, **kw)
            found: list[dict[str, Any]] = []
            if "knn" in protocols:
                found += _knn(sets, knn_ks, knn_temperature, n_boot, seed)
            if "linear_probe" in protocols:
                result = run_linear_probe(sets["training"], sets["validation"], sets["test"], linear)
                found += result.rows()
                figure = roc_figure(result.test_scores, result.test_labels, result.class_names, title=name)
                writer.add_figure(f"{name}/linear_probe_roc", figure)
                save_figure(figure, out / "pictures" / f"{name}_linear_probe_roc.png")
            if "retrieval" in protocols:
                path = out / "pictures" / f"{name}_retrieval.png"
                found += _retrieval(sets, loaders, retrieval_ks, image_key, path)
            if "finetune" in protocols:
                found += _finetune(model, loaders, sets["training"], finetune or {}, image_key, label_key, device)
            if model.has_patch_tokens and pictures > 0:
                picture = _pca_picture(model, _first_images(loaders["test"], pictures, image_key).to(device))
                writer.add_image(f"{name}/patch_features_pca", picture)
                _save_picture(picture, out / "pictures" / f"{name}_patch_pca.png")
            rows += [{"backbone": name, **row} for row in found]
    finally:
        writer.close()
    paths = write_results(rows, out, "results")
    logger.info("results written to %s", ", ".join(str(p) for p in paths.values()))
    print(format_table(rows))
    return rows


def _finetune(
    model: _Adapted,
    loaders: Mapping[str, DataLoader],
    train: FeatureSet,
    options: Mapping[str, Any],
    image_key: str,
    label_key: str,
    device: str | torch.device,
) -> list[dict[str, Any]]:
    options = dict(options)
    n_blocks, avgpool = options.pop("n_blocks", 1), options.pop("avgpool", False)
    options["fine_tune"] = resolve_finetune_flag(options.get("fine_tune", True))
    probe = _Adapted(model.adapt, ProbeFeatures(model.module, n_blocks=n_blocks, avgpool=avgpool))
    result = run_finetune(
        probe,
        loaders["training"],
        loaders["validation"],
        loaders["test"],
        num_classes=train.num_classes,
        multilabel=train.is_multilabel,
        class_names=train.class_names,
        feature_dim=probe.module.out_dim,
        image_key=image_key,
        label_key=label_key,
        device=device,
        **options,
    )
    return result.rows()
