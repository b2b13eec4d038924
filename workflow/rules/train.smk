# Training: one experiment = dataset x towers x method x LayerDrop scheme x seed.


rule train:
    input:
        dataset="resources/{dataset}/sequences.parquet",
        caches=train_caches,
    output:
        "results/runs/{dataset}/{towers}/{method}/{scheme}/{cache}/seed{seed}/metrics.json",
    log:
        "logs/train/{dataset}/{towers}/{method}/{scheme}/{cache}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train/{dataset}/{towers}/{method}/{scheme}/{cache}/seed{seed}.tsv"
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=train_mem_mb,
        runtime=240,
        speed_cuda_graphs=int(SPEED["cuda_graphs"]),
        speed_eval_batch=SPEED["eval_batch"],
        gpu=GPUS,
    params:
        # result-affecting hyper-parameters: a change reruns exactly the experiments it touches
        experiment=experiment_json,
        experiment_arg=lambda wildcards: shlex.quote(
            json.dumps(experiment_json(wildcards))
        ),
        cache_dirs=lambda wildcards, input: " ".join(
            shlex.quote(os.path.dirname(c)) for c in input.caches
        ),
    shell:
        "iisan train --experiment {params.experiment_arg} --dataset resources/{wildcards.dataset}"
        " --caches {params.cache_dirs} --cuda-graphs {resources.speed_cuda_graphs} --eval-batch {resources.speed_eval_batch} --threads {threads} --out {output:q} > {log} 2>&1"
