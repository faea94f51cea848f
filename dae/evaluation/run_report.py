"""A one-page report of a finished pretraining run: curves, collapse diagnostics, pictures, and the gain over random.

:func:`write_run_report` reads what a run folder holds (``metrics/epochs.jsonl``, ``config.yaml``, the TensorBoard
pictures) and, optionally, the ``results.json`` of an evaluation of its checkpoint, and writes ``index.md`` and
``index.html`` with the figures beside them. It works for every trainer (DINO, DAE, fine-tuning); the collapse
section is written for DINO runs, whose epoch means hold the teacher's entropy and KL to the uniform distribution.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import markdown
import yaml
from matplotlib.figure import Figure

from dae.engine.dino import ONE_HOT_ENTROPY_THRESHOLD, UNIFORM_KL_THRESHOLD, dino_part, teacher_collapse
from dae.evaluation.baselines import gain_table
from dae.evaluation.report import format_table

__all__ = ["write_run_report"]

#: settings shown at the top of the report, when the run's config.yaml has them
_SETTINGS = (
    "arch",
    "patch_size",
    "feature_size",
    "out_dim",
    "use_bn_in_head",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "global_crop_size",
    "local_crops_number",
    "roi_size",
    "choice",
    "mm_con",
    "batch_size",
    "optimizer_name",
    "lr",
    "teacher_temp",
    "momentum_teacher",
    "koleo_weight",
    "monitor_metric",
    "epochs",
    "seed",
)
#: curve panels: title -> the epoch-record keys drawn in it (those present)
_PANELS = {
    "loss": ("train_loss", "train_dino", "train_koleo", "val_loss", "train_uniform_loss"),
    "reconstruction and contrastive": ("train_reconstruction", "val_reconstruction", "train_contrastive"),
    "k-NN monitor (validation)": ("val_knn_top1", "val_knn_auroc"),
    "teacher and student": ("train_teacher_entropy", "train_student_entropy", "train_teacher_kl_uniform"),
}
_LABELS = {
    "train_uniform_loss": "ln K (uniform teacher)",
    "train_dino": "DINO part (compare with ln K)",
    "train_koleo": "KoLeo term (unweighted)",
    "val_knn_top1": "k-NN top-1 accuracy",
    "val_knn_auroc": "k-NN AUROC",
    "train_teacher_kl_uniform": "teacher KL to uniform",
}


def _epochs(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics" / "epochs.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run folder: {path} is missing")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curves(epochs: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Draw the panels the records have into ``path``; False when there is nothing to draw."""
    panels = {
        title: [k for k in keys if any(k in e for e in epochs)]
        for title, keys in _PANELS.items()
        if any(k in e for e in epochs for k in keys)
    }
    if not panels:
        return False
    figure = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    for axis, (title, keys) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for key in keys:
            points = [(e["epoch"], e[key]) for e in epochs if key in e and math.isfinite(e[key])]
            axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=_LABELS.get(key, key))
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=100)
    return True


def _pictures(run_dir: Path, out: Path) -> list[tuple[str, str]]:
    """The last TensorBoard picture of every image tag, as PNG files; ``[(tag, file name)]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run_dir / "tensorboard"
    if not folder.is_dir():
        return []
    events = EventAccumulator(str(folder), size_guidance={"images": 1}).Reload()
    found = []
    for tag in sorted(events.Tags()["images"]):
        name = tag.replace("/", "_") + ".png"
        (out / name).write_bytes(events.Images(tag)[-1].encoded_image_string)
        found.append((tag, name))
    return found


def _collapse_section(last: Mapping[str, Any]) -> list[str]:
    means = {k.removeprefix("train_"): v for k, v in last.items() if k.startswith("train_")}
    if "teacher_kl_uniform" not in means or "teacher_entropy" not in means:
        return []
    state = teacher_collapse(means)
    verdict = {
        "uniform": "collapsed to a uniform output: the teacher no longer tells images apart",
        "one-hot": "collapsed to one prototype: every image gets the same output",
        None: "no collapse",
    }[state]
    return [
        "## Collapse diagnostics (last epoch)",
        "",
        "| teacher entropy | student entropy | teacher KL to uniform | DINO loss | ln K | verdict |",
        "|---|---|---|---|---|---|",
        f"| {means['teacher_entropy']:.4f} | {means.get('student_entropy', math.nan):.4f} | "
        f"{means['teacher_kl_uniform']:.4f} | {dino_part(means):.4f} | "
        f"{means.get('uniform_loss', math.nan):.4f} | {verdict} |",
        "",
        f"A teacher KL to uniform below {UNIFORM_KL_THRESHOLD} nats is a uniform collapse, a teacher entropy below "
        f"{ONE_HOT_ENTROPY_THRESHOLD} nats a collapse to one prototype. The loss alone says little: a sharp "
        "teacher and a flat student also give a loss near ln K.",
        "",
    ]


def _monitor_line(epochs: Sequence[Mapping[str, Any]], selecting: str) -> list[str]:
    """One line per k-NN monitor metric in the records; ``selecting`` is the one that chose ``best.pt``."""
    lines = []
    for metric, title in (("knn_top1", "top-1"), ("knn_auroc", "AUROC")):
        key = f"val_{metric}"
        scored = [e for e in epochs if key in e and e["epoch"] > 0]
        if not scored:
            continue
        initial = [e[key] for e in epochs if key in e and e["epoch"] == 0]
        best = max(scored, key=lambda e: e[key])
        start = f"initial weights {initial[0]:.4f} (epoch 0), " if initial else ""
        chose = ", `best.pt`" if metric == selecting else ""
        lines += [
            f"k-NN monitor ({title} on the validation list): {start}first {scored[0][key]:.4f} (epoch "
            f"{scored[0]['epoch']}), best {best[key]:.4f} (epoch {best['epoch']}{chose}), last {scored[-1][key]:.4f} "
            f"(epoch {scored[-1]['epoch']}).",
            "",
        ]
    return lines


def _evaluation_section(results: Path) -> list[str]:
    rows = json.loads(results.read_text())
    gains = gain_table(rows)
    lines = [f"## Evaluation (`{results}`)", "", format_table(rows, digits=4), ""]
    if gains:
        lines += [gains, ""]
    else:
        lines += ["No random-initialisation baseline in these results (evaluate with `compare_random: true`).", ""]
    return lines


def write_run_report(
    run_dir: str | Path, evaluation: str | Path | None = None, output: str | Path | None = None
) -> Path:
    """Write the report of ``run_dir`` and return the path of its ``index.md`` (``index.html`` is beside it).

    Args:
        run_dir: a run folder (``metrics/epochs.jsonl`` is required; ``config.yaml`` and ``tensorboard/`` are used
            when present).
        evaluation: an evaluation's results folder (holding ``results.json``, e.g.
            ``runs/xray_eval/evaluation/<test set>``) or the file itself; its table and the gain over random
            initialisation are added.
        output: the report's folder (default: ``<run_dir>/report``).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``metrics/epochs.jsonl``, or ``evaluation`` has no ``results.json``.
    """
    run_dir = Path(run_dir)
    epochs = _epochs(run_dir)
    out = Path(output) if output is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    settings = {k: config[k] for k in _SETTINGS if isinstance(config, Mapping) and k in config}
    last = epochs[-1] if epochs else {}
    lines = [f"# Pretraining report: `{run_dir}`", ""]
    lines += [f"{len(epochs)} epochs recorded, {last.get('step', 0)} iterations."]
    if settings:
        lines += ["", "Settings: " + ", ".join(f"`{k}` {v}" for k, v in settings.items()) + "."]
    lines.append("")
    if _curves(epochs, out / "curves.png"):
        lines += ["## Curves", "", "![curves](curves.png)", ""]
    # the bundle's config names the metric that kept best.pt; without it, the trainer's default
    lines += _monitor_line(epochs, settings.get("monitor_metric", "knn_top1"))
    lines += _collapse_section(last)
    pictures = _pictures(run_dir, out)
    if pictures:
        lines += ["## Pictures (last epoch written)", ""]
        lines += [f"**{tag}**\n\n![{tag}]({name})\n" for tag, name in pictures]
    if evaluation is not None:
        results = Path(evaluation)
        results = results / "results.json" if results.is_dir() else results
        if not results.is_file():
            raise FileNotFoundError(f"no evaluation results at {results} (an evaluation folder holds results.json)")
        lines += _evaluation_section(results)
    text = "\n".join(lines).rstrip() + "\n"
    (out / "index.md").write_text(text, encoding="utf-8")
    body = markdown.markdown(text, extensions=["tables"])
    head = f"<!doctype html>\n<meta charset='utf-8'>\n<title>Pretraining report</title>\n<style>{_CSS}</style>"
    html = f"{head}\n{body}\n"
    (out / "index.html").write_text(html, encoding="utf-8")
    return out / "index.md"


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
)
