# Backbones and caches: demo stand-ins, the hidden-state cache, and pruning to a LayerDrop scheme.


rule build_standin:
    input:
        titles=f"resources/{config['standin_corpus']}/items.parquet",
    output:
        "resources/backbones/{backbone}/config.json",
    log:
        "logs/backbones/{backbone}.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=lambda wildcards: spec_json(wildcards.backbone),
    shell:
        "iisan standin --name {wildcards.backbone} --spec {params.spec} --titles {input.titles:q}"
        " --out resources/backbones/{wildcards.backbone} > {log} 2>&1"


rule cache:
    input:
        unpack(cache_inputs),
    output:
        array="resources/cache/{dataset}/{field}/{backbone}/cache.npy",
        manifest="resources/cache/{dataset}/{field}/{backbone}/manifest.json",
    log:
        "logs/cache/{dataset}/{field}/{backbone}.log",
    benchmark:
        "results/benchmarks/cache/{dataset}/{field}/{backbone}.tsv"
    conda:
        "../../envs/iisan.yaml"
    threads: cache_threads
    resources:
        mem_mb=cache_mem_mb,
        runtime=cache_runtime,
        gpu=cache_gpus,
    params:
        spec=lambda wildcards: spec_json(wildcards.backbone),
        standin=standin_arg,
        images=images_arg,
        store_dtype=config["cache"]["dtype"],
        batch_size=config["cache"]["batch_size"],
    shell:
        "iisan cache --name {wildcards.backbone} --spec {params.spec} {params.standin}"
        " --items {input.item_table:q} --field {wildcards.field} {params.images}"
        " --store-dtype {params.store_dtype} --batch-size {params.batch_size} --threads {threads}"
        " --out resources/cache/{wildcards.dataset}/{wildcards.field}/{wildcards.backbone} > {log} 2>&1"


rule prune:
    input:
        prune_source,
    output:
        array="resources/cache/{dataset}/{field}/{backbone}/pruned-{tscheme}/cache.npy",
        manifest="resources/cache/{dataset}/{field}/{backbone}/pruned-{tscheme}/manifest.json",
    log:
        "logs/cache/{dataset}/{field}/{backbone}/prune-{tscheme}.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=20,
    params:
        layers=scheme_indices,
    shell:
        "iisan prune --src resources/cache/{wildcards.dataset}/{wildcards.field}/{wildcards.backbone}"
        " --layers {params.layers} --out resources/cache/{wildcards.dataset}/{wildcards.field}/{wildcards.backbone}/pruned-{wildcards.tscheme}"
        " > {log} 2>&1"
