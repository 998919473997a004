"""Rules overview_notebook, validation_notebook: run a papermill template -> executed copy.

The kernel is the Python that runs this script (the workflow's environment: the venv, or
the rule's conda env), not whatever kernel named "python3" Jupyter finds first: a
kernelspec whose argv starts with ``sys.executable`` is written to a temporary directory
put first on JUPYTER_PATH, and papermill runs with that kernel. The parameters are
papermill's ``-p name value`` pairs, passed through its Python API.
"""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import start

log = start(snakemake)  # noqa: F821
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import papermill  # noqa: E402

sm = snakemake  # noqa: F821
KERNEL = "convflat-workflow"
out = Path(sm.output.notebook)
tmp_out = out.with_name(f".{out.name}.tmp.ipynb")  # renamed into place when complete
with tempfile.TemporaryDirectory() as jupyter_dir:
    spec_dir = Path(jupyter_dir, "kernels", KERNEL)
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"convflat ({sys.executable})",
        "language": "python",
    }))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [jupyter_dir] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p])
    log.info("papermill %s -> %s, kernel %s, parameters %s", sm.input.template, out,
             sys.executable, dict(sm.params.parameters))
    for attempt in range(1, 4):
        try:
            papermill.execute_notebook(
                sm.input.template, str(tmp_out), parameters=dict(sm.params.parameters),
                kernel_name=KERNEL, cwd=os.getcwd(), execution_timeout=sm.params.timeout,
                progress_bar=False, log_output=True,
            )
            break
        except Exception as exc:
            # Two kernels started at the same moment by parallel jobs can pick the same
            # free port (jupyter_client's known race): start the kernel again.
            if "Address already in use" in str(exc) and attempt < 3:
                log.warning("kernel start failed (%s); retrying", exc)
                time.sleep(random.uniform(1.0, 3.0))
                continue
            log.error("the executed copy with the failing cell is at %s", tmp_out)
            raise
os.replace(tmp_out, out)
