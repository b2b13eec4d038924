# Training: one experiment = dataset x towers x method x LayerDrop scheme x seed.


rule train:
    input:
        dataset="resources/{dataset}/sequences.parquet",
        caches=train_caches,
    output:
        "results/runs/{dataset}/{towers}/{method}/{scheme}/{cache}/seed{seed}/metrics.json",
    params:
        # result-affecting hyper-parameters: a change reruns exactly the experiments it touches
        experiment=experiment_json,
        experiment_arg=lambda wildcards: shlex.quote(json.dumps(experiment_json(wildcards))),
        cache_dirs=lambda wildcards, input: " ".join(shlex.quote(os.path.dirname(c)) for c in input.caches),
    conda:
        "../../envs/iisan.yaml"
    log:
        "logs/train/{dataset}/{towers}/{method}/{scheme}/{cache}/seed{seed}.log",
    benchmark:
        "benchmarks/train/{dataset}/{towers}/{method}/{scheme}/{cache}/seed{seed}.tsv"
    threads: 1
    resources:
        mem_mb=train_mem_mb,
        runtime=240,
        gpu=GPUS,
    shell:
        "iisan train --experiment {params.experiment_arg} --dataset resources/{wildcards.dataset}"
        " --caches {params.cache_dirs} --speed {SPEED_JSON} --threads {threads} --out {output:q} > {log} 2>&1"
