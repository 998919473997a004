# Stage 2: train one run of a study. Run ids name their hyperparameters in the style of
# Snakemake's Paramspace (width~32/depth~3/wd~0.0001/seed~0), so a path says what the model
# is. checkpoint.pt in the run directory is deliberately not an output: Snakemake never
# deletes it, and a run killed midway resumes from it (--rerun-incomplete).


rule train:
    input:
        data=run_prepared,
    output:
        model="results/runs/{study}/{run_id}/model.pt",
        init="results/runs/{study}/{run_id}/init.pt",
        record="results/runs/{study}/{run_id}/train.json",
    log:
        "results/logs/train/{study}/{run_id}.log",
    benchmark:
        "results/benchmarks/train/{study}/{run_id}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: res("train", "threads")
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=gpus("train"),
    params:
        spec=lambda wildcards: run_of(wildcards).spec,
        train=lambda wildcards: run_of(wildcards).train,
        device=config["device"],
        version=code_version("train"),
    script:
        "../scripts/train.py"


localrules:
    estimate,


rule estimate:
    """`snakemake --cores 1 estimate`: how long this config's training and measuring take."""
    log:
        "results/logs/estimate.log",
    run:
        report_estimate(config, RUNS, log[0])
