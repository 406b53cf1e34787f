"""Tag raw sentences with an exported NER model and print the entities.

    python recipes/ner_predict.py outputs/<date>/<time>/hf_model sentences.txt
    echo "Obama visited Paris with Michelle" | python recipes/ner_predict.py outputs/.../hf_model

One sentence per line; words are split on whitespace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
if (CHECKOUT / "lightning_mp").is_dir():  # a checkout, runnable without install (installed, this is the package)
    sys.path.insert(0, str(CHECKOUT))

from lightning_mp.tasks.ner.predict import tag_sentences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a directory written by the NER recipe (export_dir)")
    parser.add_argument("input", nargs="?", default="-", help="text file, one sentence per line ('-': stdin)")
    args = parser.parse_args()
    if not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"{args.model_dir} is not a Hugging Face model directory (no config.json).")
    handle = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    sentences = [line.split() for line in handle if line.strip()]
    for words, entities in zip(sentences, tag_sentences(args.model_dir, sentences)):
        found = ", ".join(f"{text} [{kind}]" for kind, text in entities) or "(no entities)"
        print(f"{' '.join(words)}\n  -> {found}")


if __name__ == "__main__":
    main()
