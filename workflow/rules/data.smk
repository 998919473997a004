# Stage 1: datasets. A torchvision benchmark is downloaded once into data/raw/<source>/
# (torchvision's own layout and checksums); every dataset is then prepared into one tensor
# file data/prepared/<name>.pt (uint8 images, labels, split, label noise). A user's own data
# are inputs of prepare: the file of an npz: source, and for a folder: source the manifest
# below, rewritten whenever a file of the folder is added, removed or changed.


rule folder_manifest:
    output:
        manifest="data/manifests/{dataset}.json",
    log:
        "results/logs/folder_manifest/{dataset}.log",
    threads: 1
    params:
        folder=manifest_folder,
        # (path, size, mtime) of every file: a change reruns this job and so prepare
        digest=lambda wildcards: folder_digest(manifest_folder(wildcards)),
    run:
        write_folder_manifest(params.folder, output.manifest, log[0])


rule download:
    output:
        marker="data/raw/{source}/download.json",
    log:
        "results/logs/download/{source}.log",
    benchmark:
        "results/benchmarks/download/{source}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    params:
        root=lambda wildcards, output: str(Path(output.marker).parent),
    script:
        "../scripts/download.py"


rule prepare:
    input:
        unpack(prepare_input),
    output:
        data="data/prepared/{prepared}.pt",
    log:
        "results/logs/prepare/{prepared}.log",
    benchmark:
        "results/benchmarks/prepare/{prepared}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    params:
        dataset=dataset_config,
        root=raw_root,
        version=code_version("prepare"),
    script:
        "../scripts/prepare.py"
