"""Rule download: fetch a torchvision benchmark into data/raw/<source>/ (torchvision's own
layout and MD5 checks) and write download.json. Without network, fail with a message that
says which file to put where; a file put there by hand is verified and used as is."""

from convflat.pipeline.data import DownloadError, download_source
from convflat.pipeline.script import fail, snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    try:
        download_source(snakemake.wildcards.source, snakemake.params.root,
                        snakemake.output.marker)
    except DownloadError as exc:
        fail(str(exc), log)  # on the console, not only in the log


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("download")
    main(snakemake)
