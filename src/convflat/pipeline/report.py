"""Stage ``report`` (workflow/rules/report.smk): the notebook jobs (papermill executes a
template; nbconvert renders the executed copy to one HTML file), and what ``snakemake
--report`` says on its landing page: each study's verdict and the files it lacks
(:func:`landing_summary`)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from convflat.pipeline.notices import no_usable_runs_message, read_runs_rows

__all__ = ["EXACTNESS_ERRORS", "HIDE_INPUT_TAGS", "NOTEBOOK_KERNEL", "REMOVE_CELL_TAGS",
           "building_a_report", "landing_summary", "render_html", "run_notebook",
           "study_verdict", "validation_answer"]

log = logging.getLogger(__name__)

NOTEBOOK_KERNEL = "convflat-workflow"

#: Cell tags of the notebook templates: what the rendered HTML leaves out. The reader sees
#: the answer, figures and tables first; parameters, imports and helper code stay in the
#: executed ``.ipynb``.
HIDE_INPUT_TAGS = ("parameters", "injected-parameters", "hide-input")
REMOVE_CELL_TAGS = ("remove-cell",)

#: The exactness table's relative errors of the closed form against the dense Hessian.
EXACTNESS_ERRORS = {"rel_err_trace": "trace", "rel_err_blocks": "block traces",
                    "rel_err_kappa": "relative flatness"}


def run_notebook(template: str | os.PathLike, out: str | os.PathLike,
                 parameters: Mapping[str, Any], *, timeout: int) -> None:
    """Execute a papermill ``template`` with ``parameters`` into ``out``.

    The kernel is the Python that runs this function (the workflow's environment), not
    whatever kernel named "python3" Jupyter finds first: a kernelspec whose argv starts with
    ``sys.executable`` is written to a temporary directory put first on JUPYTER_PATH. The
    kernel talks over local IPC sockets in that directory (:func:`ipc_kernel_manager`), not
    TCP: nothing goes over the network, so ipykernel has no plain-text-TCP warning to print,
    and no port can be taken by another job. A kernel that fails to start all the same
    because of an address in use is started again, twice at most. The executed copy is
    renamed into place when complete; a failing one stays beside it.
    """
    import papermill  # not at import: the Snakemake process builds the report without it

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
                    progress_bar=False, log_output=True,
                    kernel_manager_class=ipc_kernel_manager(jupyter_dir))
                break
            except Exception as exc:
                if "Address already in use" in str(exc) and attempt < 3:
                    log.warning("kernel start failed (%s); retrying", exc)
                    time.sleep(random.uniform(1.0, 3.0))
                    continue
                log.error("the executed copy with the failing cell is at %s", tmp_out)
                raise
    os.replace(tmp_out, out)


def ipc_kernel_manager(directory: str | os.PathLike) -> type:
    """A jupyter_client kernel manager class (papermill's ``kernel_manager_class``) whose
    kernels use the IPC transport, their sockets named ``<directory>/kernel-<n>``: local
    files instead of TCP ports on 127.0.0.1."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    prefix = str(Path(directory, "kernel"))

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self) -> str:
            return "ipc"

        @default("ip")
        def _default_ip(self) -> str:
            return prefix

    return IPCKernelManager


def render_html(notebook: str | os.PathLike, html: str | os.PathLike) -> int:
    """An executed notebook as one self-contained HTML file (images inlined), written
    atomically; returns its length in characters. The code of cells tagged
    :data:`HIDE_INPUT_TAGS` is left out (their output stays), cells tagged
    :data:`REMOVE_CELL_TAGS` entirely, and so are input and output prompts. Imports no
    torch."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor

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


# ------------------------------------------------------------------- snakemake --report


def building_a_report(argv: Sequence[str]) -> bool:
    """Whether the Snakemake command line ``argv`` builds the HTML report (``--report
    [FILE]``) instead of running jobs; not with ``--report-after-run``, whose jobs have yet
    to make the files (and whose report is built only when every job succeeded)."""
    return "--report-after-run" not in argv and any(
        a == "--report" or a.startswith("--report=") for a in argv)


def study_verdict(headline: str | os.PathLike) -> str:
    """The first paragraph of a study's ``headline.md`` after its title: the verdict
    (:func:`convflat.analysis.write_headline` writes it first), joined into one line."""
    paragraph: list[str] = []
    for line in Path(headline).read_text().splitlines():
        if line.startswith("#") and not paragraph:
            continue  # the title
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    return " ".join(paragraph)


def landing_summary(studies: Mapping[str, Mapping[str, str | os.PathLike]],
                    targets: Iterable[str | os.PathLike], *,
                    require_converged: bool) -> dict[str, Any]:
    """What the report's landing page (workflow/report/workflow.rst) opens with, from the
    files that exist when the report is built: for each study (``studies``: study ->
    ``{"headline": path, "runs": path}``) one line, its verdict from ``headline.md``, or
    why it has none (no usable run: each run's reason; no runs table yet); and
    ``missing``: those of ``targets`` (every file the workflow makes) that do not exist,
    so are left out of the report."""
    verdicts = []
    for study, files in studies.items():
        headline, runs = Path(files["headline"]), Path(files["runs"])
        if headline.is_file():
            text = study_verdict(headline) or f"see {headline}"
        elif runs.is_file():
            problem = no_usable_runs_message(read_runs_rows(runs), study,
                                             require_converged=require_converged)
            text = ("no result: " + problem.split(", so there", 1)[0].split(": ", 1)[1]
                    + f"; see {runs}" if problem else
                    f"no headline yet ({headline} does not exist); runs table {runs}")
        else:
            text = f"no result yet: its runs table {runs} does not exist"
        verdicts.append({"study": study, "text": text})
    missing = sorted({str(t) for t in targets if not Path(t).exists()})
    return {"verdicts": verdicts, "missing": missing}


# ------------------------------------------------------------- the validation notebook


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _truth(value: Any) -> bool | None:
    """An ``agrees`` cell: True / False (bools or their CSV spellings), None otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text == "true" else False if text == "false" else None


def validation_answer(exactness: Sequence[Mapping[str, Any]],
                      invariance: Sequence[Mapping[str, Any]]) -> str:
    """The validation notebook's opening paragraph (Markdown) from the records of its
    exactness and invariance tables: the worst relative error of the closed form against
    the dense autograd Hessian over every architecture (and which quantity it was), and
    whether every invariance check agreed with theory, naming those that did not."""
    worst, where, failed = -1.0, "", 0
    per_quantity: dict[str, float] = {}
    for row in exactness:
        errs = {col: _finite(row.get(col)) for col in EXACTNESS_ERRORS}
        if any(e is None for e in errs.values()):
            failed += 1
        for col, err in errs.items():
            if err is None:
                continue
            per_quantity[col] = max(per_quantity.get(col, 0.0), err)
            if err > worst:
                worst, where = err, f"{EXACTNESS_ERRORS[col]}, {row.get('architecture')}"
    if worst < 0:
        exact_text = "**Exactness: no architecture has a relative error** (every row failed)."
    else:
        exact_text = (f"**Exactness:** the closed form matches the dense autograd Hessian to a "
                      f"worst relative error of **{worst:.2g}** ({where}) over "
                      f"{len(exactness)} architecture(s); per quantity: "
                      + ", ".join(f"{EXACTNESS_ERRORS[c]} {v:.2g}"
                                  for c, v in per_quantity.items()) + "."
                      + (f" {failed} architecture(s) have no error value (failed)."
                         if failed else ""))
    checked = [(row, _truth(row.get("agrees"))) for row in invariance]
    judged = [(row, ok) for row, ok in checked if ok is not None]
    against = [row for row, ok in judged if not ok]
    unjudged = len(checked) - len(judged)
    if not judged:
        inv_text = "**Invariance:** no check could be judged against theory."
    elif not against:
        inv_text = (f"**Invariance: every check held**: all {len(judged)} measure(s) with a "
                    "stated theory moved (or stayed) as theory says under the "
                    "function-preserving rescaling.")
    else:
        names = "; ".join(
            f"{row.get('measure')}"
            + (f" ({row['model']})" if isinstance(row.get("model"), str) else "")
            + f": theory {row.get('theory')}, changed {row.get('changed')}"
            for row in against)
        inv_text = (f"**Invariance: {len(against)} of {len(judged)} check(s) did not hold**: "
                    f"{names}.")
    if unjudged:
        inv_text += (f" {unjudged} row(s) are not judged (theory 'nearly invariant', or the "
                     "measure failed).")
    return exact_text + "\n\n" + inv_text
