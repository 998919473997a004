"""Rule notebook_html: an executed notebook -> one self-contained HTML file (images inlined)."""

import logging
from pathlib import Path

sm = snakemake  # noqa: F821
log_path = Path(str(sm.log[0]))
log_path.parent.mkdir(parents=True, exist_ok=True)
logging.basicConfig(filename=log_path, filemode="w", level=logging.INFO, force=True)

import os  # noqa: E402

import nbformat  # noqa: E402
from nbconvert import HTMLExporter  # noqa: E402

nb = nbformat.read(sm.input.notebook, as_version=4)
exporter = HTMLExporter(embed_images=True)
html, _ = exporter.from_notebook_node(nb)
tmp = Path(sm.output.html).with_name(f".{Path(sm.output.html).name}.tmp")
tmp.write_text(html)
os.replace(tmp, sm.output.html)  # no torch import here: convflat.io would cost seconds
logging.info("wrote %s (%d bytes) from %s", sm.output.html, len(html), sm.input.notebook)
