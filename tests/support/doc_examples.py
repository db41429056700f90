"""Run the fenced ```bash and ```python examples of a Markdown document, in order, in one
folder, against a given server (docs/integration.md's examples must keep working).

    python -m tests.support.doc_examples docs/integration.md WORKDIR [HOST:PORT MODEL]

prints each block's output, so the figures in the document can be refreshed from a run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DOC_HOST = "localhost:8000"
DOC_MODEL = "pneumonia-mobilenet-224"
_BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Ran:
    language: str
    code: str
    returncode: int
    output: str


def blocks(markdown: str) -> list[tuple[str, str]]:
    return [(match.group(1), match.group(2)) for match in _BLOCK.finditer(markdown)]


def run_examples(
    doc: Path, workdir: Path, host: str = DOC_HOST, model: str = DOC_MODEL, timeout: float = 120.0
) -> list[Ran]:
    ran: list[Ran] = []
    env = dict(os.environ)
    # The examples' own imports (numpy, pydicom, tritonclient...) from this interpreter.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for language, code in blocks(doc.read_text()):
        code = code.replace(DOC_HOST, host).replace(DOC_MODEL, model)
        command = (
            ["bash", "-euo", "pipefail", "-c", code]
            if language == "bash"
            else [sys.executable, "-c", code]
        )
        result = subprocess.run(
            command,
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        ran.append(Ran(language, code, result.returncode, result.stdout + result.stderr))
        if result.returncode != 0:
            break
    return ran


if __name__ == "__main__":
    doc_path, folder = Path(sys.argv[1]), Path(sys.argv[2])
    extra = sys.argv[3:5]
    for item in run_examples(doc_path, folder, *extra):
        print(f"--- {item.language} (exit {item.returncode})\n{item.output}")
