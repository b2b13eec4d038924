# Training: one experiment = dataset x towers x method x LayerDrop scheme x seed.


rule train:
    input:
        unpack(uncached_inputs),
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
        speed_compile=int(SPEED["compile"]),
        speed_checkpoint_every_s=SPEED["checkpoint_every_s"],
        gpu=GPUS,
        # not results either: keep checkpoint.pt beside metrics.json; the retry number for the log
        keep_checkpoint=int(config.get("keep_checkpoints", False)),
        attempt=lambda wildcards, attempt: attempt,
    params:
        # result-affecting hyper-parameters: a change reruns exactly the experiments it touches
        experiment=experiment_json,
        experiment_arg=lambda wildcards: shlex.quote(
            json.dumps(experiment_json(wildcards))
        ),
        cache_dirs=lambda wildcards, input: " ".join(
            shlex.quote(os.path.dirname(c)) for c in input.caches
        ),
        uncached=uncached_args,
    # A killed run resumes from the checkpoint.pt that `iisan train` saves beside its output every
    # epoch. Snakemake deletes {log} before each attempt, so every attempt is appended (live) to
    # {log}.attempts under a dated header and {log} is rebuilt as the earlier attempts + this one.
    shell:
        "touch {log}.attempts && cp {log}.attempts {log};"
        " {{ echo == $(date -Iseconds) attempt {resources.attempt} ==;"
        " iisan train --experiment {params.experiment_arg} --dataset resources/{wildcards.dataset}"
        " --caches {params.cache_dirs} {params.uncached} --cuda-graphs {resources.speed_cuda_graphs} --eval-batch {resources.speed_eval_batch} --compile {resources.speed_compile} --threads {threads}"
        " --checkpoint-every-s {resources.speed_checkpoint_every_s} --keep-checkpoint {resources.keep_checkpoint} --out {output:q} 2>&1; }} | tee -a {log}.attempts >> {log}"


rule profile:
    input:
        unpack(uncached_inputs),
        dataset="resources/{dataset}/sequences.parquet",
        caches=train_caches,
    output:
        "results/efficiency/{dataset}/{towers}/{method}/{scheme}/{cache}/batch{batch}.json",
    log:
        "logs/efficiency/{dataset}/{towers}/{method}/{scheme}/{cache}/batch{batch}.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=train_mem_mb,
        runtime=60,
        speed_cuda_graphs=int(SPEED["cuda_graphs"]),
        speed_eval_batch=SPEED["eval_batch"],
        speed_compile=int(SPEED["compile"]),
        gpu=GPUS,
    params:
        experiment_arg=profile_experiment_arg,
        cache_dirs=lambda wildcards, input: " ".join(
            shlex.quote(os.path.dirname(c)) for c in input.caches
        ),
        uncached=uncached_args,
        steps=config.get("efficiency", {}).get("steps", 10),
    shell:
        "iisan profile --experiment {params.experiment_arg} --dataset resources/{wildcards.dataset}"
        " --caches {params.cache_dirs} {params.uncached} --batch-size {wildcards.batch} --steps {params.steps}"
        " --cuda-graphs {resources.speed_cuda_graphs} --eval-batch {resources.speed_eval_batch} --compile {resources.speed_compile} --threads {threads} --out {output:q} > {log} 2>&1"
