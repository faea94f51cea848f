"""What the benchmark scripts share: the command line, the bundle trainers, the timed loops, the results table.

A script describes its benchmark with a :class:`Benchmark` (what a sample is, what determines the FLOP count, how
a row of its table reads) and calls :func:`run`, which times one setting, or with ``--compare KEY=A,B`` two
settings side by side in one process, prints throughput, FLOP/sample, achieved TFLOP/s and MFU, and appends the
rows to ``benchmarks/results.md``. The FLOP counting, its cache and the GPU peaks are in ``flops.py``.

The module is a little over 400 lines on purpose: the command line, the timed loop and the two ways of running it
are one flow, read top to bottom.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import monai
import torch
from fire.parser import DefaultParseValue
from flops import CACHE, format_mfu, peak_tflops, precision, sample_flops
from monai.bundle import ConfigParser

from dae.utils.performance import backend_settings

RESULTS = Path(__file__).resolve().parent / "results.md"


def parse_value(text: str) -> object:
    """A command-line value as the bundle expects it: ``true``/``false`` in any case as booleans, ``10`` as an int,
    ``[96,96,96]`` as a list, anything else as the string (``bf16``, ``none``)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return DefaultParseValue(text)


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``"[64,64,64],[96,96,96]"`` gives two lists."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def parse_compare(text: str) -> tuple[str, object, object]:
    """``KEY=A,B`` as the config key and its two values.

    Raises:
        argparse.ArgumentTypeError: when ``text`` is not of that form.
    """
    key, _, values = text.partition("=")
    parts = _split_top_level(values)
    if not key or len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"--compare takes KEY=A,B (two values), got {text!r}")
    return key, parse_value(parts[0]), parse_value(parts[1])


def parse_args(description: str, default_configs: list[str]) -> tuple[argparse.Namespace, dict[str, object]]:
    """The benchmark options, and the ``--key value`` pairs that override bundle config keys."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", nargs="+", default=default_configs)
    parser.add_argument("--steps", type=int, default=20, help="timed iterations (of each setting with --compare)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (of each setting)")
    parser.add_argument(
        "--compare",
        type=parse_compare,
        action="append",
        default=[],
        metavar="KEY=A,B",
        help="time the config with KEY=A and with KEY=B side by side, alternating blocks of --block iterations; "
        "may be given several times (one comparison after the other)",
    )
    parser.add_argument("--block", type=int, default=5, help="iterations per block with --compare")
    parser.add_argument("--flops_cache", type=Path, default=CACHE, help="JSON file of counted FLOP per sample")
    parser.add_argument("--note", default="", help="free text for the results table")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file the rows are appended to")
    parser.add_argument("--no_record", action="store_true", help="do not append rows to the results file")
    args, rest = parser.parse_known_args()
    if args.steps < 1 or args.warmup < 0 or args.block < 1:
        parser.error(f"need --steps >= 1, --warmup >= 0, --block >= 1; got {args.steps}, {args.warmup}, {args.block}")
    overrides: dict[str, object] = {}
    for i in range(0, len(rest), 2):
        if not rest[i].startswith("--") or i + 1 >= len(rest):
            parser.error(f"overrides must be '--key value' pairs, got {rest[i:]}")
        overrides[rest[i][2:]] = parse_value(rest[i + 1])
    return args, overrides


def parse_bundle(config_files: list[str], overrides: Mapping[str, object], **fixed: object) -> ConfigParser:
    """The bundle config with a throw-away output folder, no resumption, ``fixed`` and then ``overrides`` applied."""
    parser = ConfigParser()
    parser.read_config(config_files)
    parser["output_dir"] = tempfile.mkdtemp(prefix="dae_bench_")
    parser["resume"] = False
    for key, value in {**fixed, **overrides}.items():
        parser[key] = value
    parser.parse()
    return parser


@dataclass
class Timing:
    """What one timed stretch of iterations measured."""

    samples: int
    steps: int
    seconds: float
    data_wait: float

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds

    @property
    def per_step(self) -> float:
        return self.seconds / self.steps

    @classmethod
    def median(cls, blocks: list[Timing]) -> Timing:
        """The timing of all ``blocks`` together at the median block's time per iteration; data wait over all."""
        steps = sum(t.steps for t in blocks)
        total = sum(t.seconds for t in blocks)
        return cls(
            samples=sum(t.samples for t in blocks),
            steps=steps,
            seconds=statistics.median(t.per_step for t in blocks) * steps,
            data_wait=sum(t.data_wait * t.seconds for t in blocks) / total,
        )


class TrainingLoop:
    """Real training iterations of one trainer, run in stretches that continue one another.

    Each iteration is the epoch loop's, ``Trainer.run_iteration``, on the next batch of the trainer's loader (one
    iterator, kept between stretches and re-created at the end of an epoch): ``train_step``, and every
    ``log_interval``-th and last iteration of an epoch the reading of the step records on the host (the loop's
    one synchronisation).
    A stretch synchronises the device only at its ends, so the host runs ahead of the GPU as in training.

    Args:
        trainer: a :class:`dae.engine.Trainer` built by the bundle.
        samples: the number of samples (crops, images) in a batch.
        settings: called before every stretch, e.g. to set the process-wide backend flags of this trainer's config.
    """

    def __init__(
        self, trainer: Any, samples: Callable[[Any], int], settings: Callable[[], None] = lambda: None
    ) -> None:
        self.trainer = trainer
        self.samples = samples
        self.settings = settings
        self.device: torch.device = trainer.device
        self._batches: Iterator[Any] | None = None
        self._index = 0
        self._pending: list[tuple[int, dict[str, Any]]] = []
        trainer.model.train()

    def next_batch(self) -> Any:
        """The next batch of the training loader, starting a new epoch when the last one is used up."""
        if self._batches is not None:
            batch = next(self._batches, None)
            if batch is not None:
                self._index += 1
                return batch
        self._batches, self._index = iter(self.trainer.train_loader), 0
        return next(self._batches)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> Timing:
        """Run ``steps`` iterations after ``settings()``; the time includes waiting for their batches."""
        trainer = self.trainer
        self.settings()
        self.sync()
        wait, samples, start = 0.0, 0, time.perf_counter()
        for _ in range(steps):
            tic = time.perf_counter()
            batch = self.next_batch()
            wait += time.perf_counter() - tic
            trainer.run_iteration(batch, self._index, self._pending)
            samples += self.samples(batch)
        self.sync()
        seconds = time.perf_counter() - start
        return Timing(samples=samples, steps=steps, seconds=seconds, data_wait=wait / seconds)


def cpu_name() -> str:
    """The CPU model and core count."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()})"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new GPU peak-memory measurement (the process's peak RSS on CPU cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak GPU allocation since the last reset, or the process's peak resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_memory(device: torch.device, gib: float) -> str:
    """``gib`` with what it measures: the GPU's allocation or the process's resident memory (RSS)."""
    return f"{gib:.2f} GiB ({'GPU' if device.type == 'cuda' else 'RSS'})"


def peak_memory(device: torch.device) -> str:
    """Peak GPU allocation since the last reset, or the process's peak resident memory on CPU."""
    return format_memory(device, peak_gib(device))


def append_row(title: str, header: str, row: str, results: Path = RESULTS) -> None:
    """Add ``row`` at the end of the table under the ``title`` heading, creating the section when missing."""
    lines = results.read_text().splitlines() if results.is_file() else ["# Benchmark results"]
    if title not in lines:
        lines += ["", title, "", *header.rstrip("\n").splitlines()]
        lines.append(row.rstrip("\n"))
    else:
        end = lines.index(title) + 1
        while end < len(lines) and not lines[end].startswith("## "):
            end += 1
        while lines[end - 1] == "":
            end -= 1
        lines.insert(end, row.rstrip("\n"))
    results.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- the benchmark run
@dataclass
class Benchmark:
    """What a benchmark script tells :func:`run`.

    Attributes:
        name: the benchmark's name in the FLOP cache, e.g. ``"dae_pretrain"``.
        title: the heading of its table in ``results.md``.
        header: the table's header lines.
        unit: what a sample is, plural (``"samples"``, ``"images"``).
        samples: the number of samples in a batch.
        flop_key: the values that determine the FLOP per sample, from the config and a batch (network shape,
            input sizes); with ``name`` they key the FLOP cache.
        config_cells: the table cells that describe the config, between the versions and the throughput.
        fixed: config values every run of the benchmark sets, e.g. ``{"knn_monitor": False}``.
    """

    name: str
    title: str
    header: str
    unit: str
    samples: Callable[[Any], int]
    flop_key: Callable[[ConfigParser, Any], dict[str, object]]
    config_cells: Callable[[ConfigParser], list[object]]
    fixed: dict[str, object] = field(default_factory=dict)


@dataclass
class Setting:
    """One config of a benchmark run: its parsed config, its training loop and its FLOP per sample."""

    config: ConfigParser
    loop: TrainingLoop
    flop_per_sample: float

    @property
    def precision(self) -> str:
        get = self.config.get_parsed_content
        return precision(get("amp"), bool(get("tf32", default=True)), self.loop.device)


@dataclass
class Result:
    """What was measured for one setting, and what follows from it."""

    setting: Setting
    timing: Timing
    memory: str

    @property
    def achieved(self) -> float:
        """Achieved TFLOP/s: FLOP per sample x samples per second."""
        return self.setting.flop_per_sample * self.timing.per_second / 1e12

    @property
    def mfu(self) -> str:
        """Achieved over peak TFLOP/s as a percentage, or "n/a" without a peak."""
        return format_mfu(self.achieved, peak_tflops(self.setting.loop.device, self.setting.precision))

    def summary(self, unit: str) -> str:
        """Two lines: throughput, step time, memory and data wait; FLOP/sample, TFLOP/s and MFU."""
        t, prec = self.timing, self.setting.precision
        peak = peak_tflops(self.setting.loop.device, prec)
        return (
            f"{t.per_second:.3g} {unit}/s, {t.per_step:.3f} s/iter, peak {self.memory}, data wait {t.data_wait:.1%} "
            f"over {t.steps} iterations\n"
            f"  FLOP/sample {self.setting.flop_per_sample / 1e12:.4g} TFLOP (forward + backward), "
            f"TFLOP/s {self.achieved:.3g}, MFU {self.mfu} ({prec} peak {'n/a' if peak is None else peak})"
        )

    def row(self, benchmark: Benchmark, note: str) -> str:
        """The row of the results table."""
        t = self.timing
        cells = [
            datetime.date.today(),
            device_name(self.setting.loop.device),
            f"{torch.__version__} / {monai.__version__}",
            *benchmark.config_cells(self.setting.config),
            f"{t.per_second:.3g}",
            f"{t.per_step:.3f}",
            f"{self.setting.flop_per_sample / 1e12:.4g}",
            f"{self.achieved:.3g}",
            self.mfu,
            self.memory,
            f"{t.data_wait:.1%}",
            note,
        ]
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |\n"


def build_setting(
    benchmark: Benchmark, config_files: list[str], overrides: Mapping[str, object], cache: Path
) -> Setting:
    """Parse the config with ``overrides``, build its trainer and loop, and get its FLOP per sample.

    The config's backend flags (``cudnn_benchmark``, ``tf32``; True when the config has none) are set now and
    before every stretch of its loop. Without a ``cache`` entry, the FLOP are counted on the loop's first batch.

    Args:
        benchmark: the benchmark.
        config_files: the bundle's config files.
        overrides: config values to set.
        cache: the FLOP cache file.
    """
    config = parse_bundle(config_files, overrides, **benchmark.fixed)
    get = config.get_parsed_content
    flags = (bool(get("cudnn_benchmark", default=True)), bool(get("tf32", default=True)))
    backend_settings(*flags)
    loop = TrainingLoop(get("trainer"), benchmark.samples, lambda: backend_settings(*flags))
    batch = loop.next_batch()
    description = {"benchmark": benchmark.name, **benchmark.flop_key(config, batch)}
    return Setting(config, loop, sample_flops(loop.trainer, batch, benchmark.samples(batch), description, cache))


def run(benchmark: Benchmark, description: str, default_configs: list[str]) -> None:
    """The command line of a benchmark script: time one setting, or compare settings; print and record the rows.

    Args:
        benchmark: the benchmark.
        description: the script's help text.
        default_configs: the config files without ``--config_file``.

    Raises:
        KeyError: when a ``--compare`` key is not a key of the bundle config (before anything is built).
    """
    args, overrides = parse_args(description, default_configs)
    note = args.note or " ".join(sys.argv[1:])
    config = ConfigParser()
    config.read_config(args.config_file)
    for key, _, _ in args.compare:
        if key not in config:
            raise KeyError(f"--compare {key}: not a key of the config {args.config_file}")
    if not args.compare:
        setting = build_setting(benchmark, args.config_file, overrides, args.flops_cache)
        loop = setting.loop
        loop.run(args.warmup)
        reset_peak_memory(loop.device)
        result = Result(setting, loop.run(args.steps), peak_memory(loop.device))
        print(f"{device_name(loop.device)}: {result.summary(benchmark.unit)}")
        if not args.no_record:
            append_row(benchmark.title, benchmark.header, result.row(benchmark, note), args.results)
        return
    for key, a, b in args.compare:
        results = compare(benchmark, args, overrides, key, (a, b))
        if not args.no_record:
            ratio = results[1].timing.per_step / results[0].timing.per_step
            for value, result in zip((a, b), results):
                text = f"{key}={value}: compare {key}={a}|{b} (B/A step time {ratio:.3f}); {note}"
                append_row(benchmark.title, benchmark.header, result.row(benchmark, text), args.results)
        del results
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare(
    benchmark: Benchmark,
    args: argparse.Namespace,
    overrides: Mapping[str, object],
    key: str,
    values: tuple[object, object],
) -> list[Result]:
    """Time the config with ``key`` set to each of ``values`` side by side in this process, and print the results.

    Both trainers are built first, each with its own loader iterator; each is warmed up, then blocks of
    ``args.block`` iterations alternate between them until each has run ``args.steps``, so that both see the
    same state of the machine (clocks, temperature, other jobs). Before each block the backend flags of that
    block's config are set. Step time and throughput are the medians over a setting's blocks; peak memory is
    the highest over its blocks, and on a GPU it includes the other trainer's weights and optimizer state.

    Args:
        benchmark: the benchmark.
        args: the command-line options (config files, steps, warm-up, block, FLOP cache).
        overrides: config values both settings have.
        key: the config key compared.
        values: its values A and B.

    Returns:
        The results of A and B.
    """
    settings = [build_setting(benchmark, args.config_file, {**overrides, key: v}, args.flops_cache) for v in values]
    for setting in settings:
        setting.loop.run(args.warmup)
    blocks: list[list[Timing]] = [[], []]
    peaks = [0.0, 0.0]
    while sum(t.steps for t in blocks[1]) < args.steps:
        size = min(args.block, args.steps - sum(t.steps for t in blocks[1]))
        for side, setting in enumerate(settings):
            reset_peak_memory(setting.loop.device)
            blocks[side].append(setting.loop.run(size))
            peaks[side] = max(peaks[side], peak_gib(setting.loop.device))
    device = settings[0].loop.device
    results = [
        Result(setting, Timing.median(timings), format_memory(device, peak))
        for setting, timings, peak in zip(settings, blocks, peaks)
    ]
    a, b = (r.timing for r in results)
    print(
        f"{device_name(device)}: compare {key}={values[0]}|{values[1]}, {args.steps} iterations each in "
        f"{len(blocks[0])} alternating blocks (medians over blocks)"
    )
    for value, result in zip(values, results):
        print(f"{key}={value}: {result.summary(benchmark.unit)}")
    print(
        f"ratio B/A ({key}={values[1]} over {key}={values[0]}): step time {b.per_step / a.per_step:.3f}, "
        f"throughput {b.per_second / a.per_second:.3f}"
    )
    return results
