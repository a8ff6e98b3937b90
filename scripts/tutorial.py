"""Execute docs/tutorial.ipynb with nbclient: ``python scripts/tutorial.py [--model NAME] [--out PATH]``.

``make tutorial`` runs it on SmolLM2-135M and keeps the outputs in docs/tutorial.ipynb; the test suite
runs it on a tiny model into a temporary file (tests/tl_plugins/test_tutorial.py). The notebook reads
its model name from ``$TL_PLUGINS_TUTORIAL_MODEL``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


def execute(model: str, out: Path, timeout: int = 900) -> Path:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["TL_PLUGINS_TUTORIAL_MODEL"] = model
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    t0 = time.perf_counter()
    client.execute()
    nb.metadata["tl_plugins"] = {"executed_on": model, "seconds": round(time.perf_counter() - t0, 1)}
    nbformat.write(nb, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(NOTEBOOK))
    args = ap.parse_args(argv)
    path = execute(args.model, Path(args.out))
    print(f"executed {NOTEBOOK.name} on {args.model} -> {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
