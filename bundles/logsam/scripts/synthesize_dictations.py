"""Synthesise spoken dictations for the entries of a LoGSAM datalist with espeak-ng (offline, deterministic).

For each chosen entry the script writes a short radiology dictation naming the entry's class, in English or
German, sometimes with a negated distractor of another class ("No evidence of glioma. Findings are consistent
with a meningioma."), speaks it with ``espeak-ng -s 140`` and stores it as a 16 kHz mono FLAC file. The updated
datalist gets three keys on those entries: ``"dictation"`` (the audio path, relative to ``--data_dir``),
``"report"`` (the dictated text) and ``"language"`` (``"en"`` or ``"de"``). With ``--no_tumour_rate`` a share of the
entries instead gets a dictation that names no tumour ("No intracranial mass.", "No evidence of glioma.") and the
key ``"dictated_class": "healthy"``: the pipeline must then stop without a mask, although the image shows a tumour
(the case of a radiologist who rules a finding out). The text of an entry depends only on ``--seed`` and the entry,
not on which other entries are chosen.

Needs the Debian package ``espeak-ng`` and ``soundfile``/``scipy`` (``pip install -e ".[logsam]"``). espeak speech
is robotic: a speech recogniser does worse on it than on a person, which makes these dictations a pessimistic test.

Example::

    python bundles/logsam/scripts/synthesize_dictations.py --datalist jsons/logsam_demo.json --data_dir data \\
        --audio_dir data/mr/brain_tumor_figshare/dictations --split test --per_class 10 --no_tumour_rate 0.1 \\
        --out_datalist jsons/logsam_demo.json

(the command that made the demo's dictations).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import soundfile

from dae.logsam.classes import HEALTHY, ClassTable
from dae.logsam.speech import SAMPLE_RATE, load_audio

VOICES = {"en": "en-us", "de": "de"}
"""espeak-ng voice per language."""

PLACES = {
    "en": ["in the left hemisphere", "in the right hemisphere", "near the midline"],
    "de": ["links", "rechts", "nahe der Mittellinie"],
}
POSITIVE = {
    "en": [
        "There is an enhancing lesion {place}, consistent with {a_term}.",
        "Findings are consistent with {a_term}.",
        "MRI of the brain shows {a_term} {place}.",
    ],
    "de": [
        "Kontrastmittelaufnehmende Raumforderung {place}, vereinbar mit {term}.",
        "Der Befund ist vereinbar mit {term}.",
        "Raumforderung {place}, am ehesten {term}.",
    ],
}
WITH_DISTRACTOR = {
    "en": [
        "No evidence of {other}. Findings are consistent with {a_term}.",
        "There is no evidence of {other}, findings are consistent with {a_term}.",
        "{Other} is ruled out; suspected {term}.",
    ],
    "de": [
        "Kein Hinweis auf {other}. Der Befund ist vereinbar mit {term}.",
        "Kein Hinweis auf {other}, der Befund ist vereinbar mit {term}.",
        "{Other} ausgeschlossen. Verdacht auf {term}.",
    ],
}
NO_TUMOUR = {
    "en": ["No intracranial mass.", "Normal MRI of the brain.", "No evidence of {other}."],
    "de": ["Keine intrakranielle Raumforderung.", "Unauffälliger Befund.", "Kein Hinweis auf {other}."],
}


def dictation_text(
    class_name: str, language: str, rng: random.Random, table: ClassTable, distractor_rate: float
) -> str:
    """A dictation naming ``class_name`` (or no tumour for ``healthy``), drawn with ``rng``.

    Args:
        class_name: a class of ``table``.
        language: ``"en"`` or ``"de"``.
        rng: the entry's random generator.
        table: the class table; class words are its terms in ``language``.
        distractor_rate: probability of adding a negated mention of another class.

    Returns:
        The text.
    """
    others = [n for n in table.tumour_names if n != class_name]
    other = _term(table, rng.choice(others), language, rng)
    if class_name == HEALTHY:
        template = rng.choice(NO_TUMOUR[language])
    elif rng.random() < distractor_rate:
        template = rng.choice(WITH_DISTRACTOR[language])
    else:
        template = rng.choice(POSITIVE[language])
    term = "" if class_name == HEALTHY else _term(table, class_name, language, rng)
    return template.format(
        term=term,
        a_term=f"{'an' if term[:1].lower() in 'aeiou' else 'a'} {term}",
        other=other,
        Other=other[:1].upper() + other[1:],
        place=rng.choice(PLACES[language]),
    )


def _term(table: ClassTable, class_name: str, language: str, rng: random.Random) -> str:
    """One of the class's terms in ``language`` (the names used in reports, not the misspelt variants)."""
    terms = next(c for c in table.classes if c.name == class_name).terms.get(language)
    if not terms:
        raise ValueError(f"class {class_name!r} has no terms in language {language!r} in {table.source}")
    return rng.choice(terms)


def synthesize(text: str, language: str, target: Path, speed: int = 140) -> float:
    """Speak ``text`` with espeak-ng and write it to ``target`` as 16 kHz mono 16-bit FLAC.

    Returns:
        The duration in seconds.

    Raises:
        RuntimeError: when espeak-ng fails.
    """
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "speech.wav"
        command = ["espeak-ng", "-v", VOICES[language], "-s", str(speed), "-w", str(wav), text]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"espeak-ng failed ({done.returncode}) for {text!r}: {done.stderr.strip()}")
        samples = load_audio(wav, SAMPLE_RATE)
    target.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(target, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return samples.size / SAMPLE_RATE


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datalist", type=Path, required=True, help="the datalist JSON (training/validation/test)")
    parser.add_argument("--out_datalist", type=Path, required=True, help="where to write the updated datalist")
    parser.add_argument("--data_dir", type=Path, default=Path("."), help="folder the datalist paths are relative to")
    parser.add_argument("--audio_dir", type=Path, help="where the FLAC files go (default: <data_dir>/dictations)")
    parser.add_argument("--split", default="test", help="the datalist key whose entries get dictations")
    parser.add_argument("--limit", type=int, help="only the first N entries of the split")
    parser.add_argument("--per_class", type=int, help="only the first N entries of each class of the split")
    parser.add_argument("--languages", nargs="+", default=["en", "de"], choices=sorted(VOICES))
    parser.add_argument("--distractor_rate", type=float, default=0.5, help="share of texts with a negated distractor")
    parser.add_argument(
        "--no_tumour_rate", type=float, default=0.0, help="share of entries whose dictation names no tumour"
    )
    parser.add_argument("--speed", type=int, default=140, help="espeak-ng words per minute")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=Path, help="a class table YAML (default: the packaged table)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit status."""
    args = parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("espeak-ng is not installed (Debian: apt-get install espeak-ng)", file=sys.stderr)
        return 1
    table = ClassTable.from_yaml(args.classes) if args.classes else ClassTable.default()
    datalist = json.loads(args.datalist.read_text(encoding="utf-8"))
    if args.split not in datalist:
        print(f"{args.datalist} has no split {args.split!r}; it has {sorted(datalist)}", file=sys.stderr)
        return 1
    audio_dir = args.audio_dir or args.data_dir / "dictations"
    entries = datalist[args.split][: args.limit]
    if args.per_class is not None:
        seen: dict[str, int] = {}
        chosen = []
        for entry in entries:
            seen[entry.get("class")] = seen.get(entry.get("class"), 0) + 1
            if seen[entry.get("class")] <= args.per_class:
                chosen.append(entry)
        entries = chosen
    for index, entry in enumerate(entries):
        name = entry.get("class")
        if name not in table.names:
            print(
                f"{args.datalist}: {args.split}[{index}] has class {name!r}, not one of {table.names}", file=sys.stderr
            )
            return 1
        key = entry.get("id") or entry.get("image") or str(index)
        rng = random.Random(f"{args.seed}:{key}")
        language = rng.choice(args.languages)
        dictated = HEALTHY if rng.random() < args.no_tumour_rate else name
        text = dictation_text(dictated, language, rng, table, args.distractor_rate)
        stem = Path(str(entry.get("image", key))).stem
        target = audio_dir / f"{args.split}_{index:04d}_{stem}_{language}.flac"
        seconds = synthesize(text, language, target, args.speed)
        entry.update({"dictation": _relative(target, args.data_dir), "report": text, "language": language})
        if dictated != name:
            entry["dictated_class"] = dictated
        print(f"{target} ({seconds:.1f} s, {language}): {text}")
    args.out_datalist.parent.mkdir(parents=True, exist_ok=True)
    args.out_datalist.write_text(json.dumps(datalist, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(entries)} dictations and {args.out_datalist}")
    return 0


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


if __name__ == "__main__":
    raise SystemExit(main())
