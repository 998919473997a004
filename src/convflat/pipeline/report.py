"""Stage ``report`` (workflow/rules/report.smk): the notebook jobs (papermill executes a
template; nbconvert renders the executed copy to one HTML file)."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbconvert import HTMLExporter
from nbconvert.preprocessors import TagRemovePreprocessor

__all__ = ["HIDE_INPUT_TAGS", "NOTEBOOK_KERNEL", "REMOVE_CELL_TAGS", "render_html",
           "run_notebook"]

log = logging.getLogger(__name__)

NOTEBOOK_KERNEL = "convflat-workflow"

#: Cell tags of the notebook templates: what the rendered HTML leaves out. The reader sees
#: the answer, figures and tables first; parameters, imports and helper code stay in the
#: executed ``.ipynb``.
HIDE_INPUT_TAGS = ("parameters", "injected-parameters", "hide-input")
REMOVE_CELL_TAGS = ("remove-cell",)


def run_notebook(template: str | os.PathLike, out: str | os.PathLike,
                 parameters: Mapping[str, Any], *, timeout: int) -> None:
    """Execute a papermill ``template`` with ``parameters`` into ``out``.

    The kernel is the Python that runs this function (the workflow's environment), not
    whatever kernel named "python3" Jupyter finds first: a kernelspec whose argv starts with
    ``sys.executable`` is written to a temporary directory put first on JUPYTER_PATH. A
    kernel that fails to start because another job took its port (jupyter_client's race
    between kernels started at the same moment) is started again, twice at most. The
    executed copy is renamed into place when complete; a failing one stays beside it.
    """
    out = Path(out)
    tmp_out = out.with_name(f".{out.name}.tmp.ipynb")
    with tempfile.TemporaryDirectory() as jupyter_dir:
        spec_dir = Path(jupyter_dir, "kernels", NOTEBOOK_KERNEL)
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"convflat ({sys.executable})", "language": "python"}))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [jupyter_dir] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
                             if p])
        log.info("papermill %s -> %s, kernel %s, parameters %s", template, out,
                 sys.executable, dict(parameters))
        for attempt in range(1, 4):
            try:
                papermill.execute_notebook(
                    str(template), str(tmp_out), parameters=dict(parameters),
                    kernel_name=NOTEBOOK_KERNEL, cwd=os.getcwd(), execution_timeout=timeout,
                    progress_bar=False, log_output=True)
                break
            except Exception as exc:
                if "Address already in use" in str(exc) and attempt < 3:
                    log.warning("kernel start failed (%s); retrying", exc)
                    time.sleep(random.uniform(1.0, 3.0))
                    continue
                log.error("the executed copy with the failing cell is at %s", tmp_out)
                raise
    os.replace(tmp_out, out)


def render_html(notebook: str | os.PathLike, html: str | os.PathLike) -> int:
    """An executed notebook as one self-contained HTML file (images inlined), written
    atomically; returns its length in characters. The code of cells tagged
    :data:`HIDE_INPUT_TAGS` is left out (their output stays), cells tagged
    :data:`REMOVE_CELL_TAGS` entirely, and so are input and output prompts. Imports no
    torch."""
    nb = nbformat.read(str(notebook), as_version=4)
    exporter = HTMLExporter(embed_images=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    exporter.register_preprocessor(
        TagRemovePreprocessor(remove_input_tags=set(HIDE_INPUT_TAGS),
                              remove_cell_tags=set(REMOVE_CELL_TAGS), enabled=True),
        enabled=True)
    text, _ = exporter.from_notebook_node(nb)
    tmp = Path(html).with_name(f".{Path(html).name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, html)
    return len(text)
