# Backbones and caches: demo stand-ins, the hidden-state cache, and pruning to a LayerDrop scheme.


rule build_standin:
    input:
        titles=f"resources/{config['standin_corpus']}/items.parquet",
    output:
        "resources/backbones/{backbone}/config.json",
    params:
        spec=lambda wildcards: spec_json(wildcards.backbone),
    conda:
        "../../envs/iisan.yaml"
    log:
        "logs/backbones/{backbone}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "iisan standin --name {wildcards.backbone} --spec {params.spec} --titles {input.titles:q}"
        " --out resources/backbones/{wildcards.backbone} > {log} 2>&1"


rule cache:
    input:
        unpack(cache_inputs),
    output:
        array="resources/cache/{dataset}/{field}/{backbone}/cache.npy",
        manifest="resources/cache/{dataset}/{field}/{backbone}/manifest.json",
    params:
        spec=lambda wildcards: spec_json(wildcards.backbone),
        standin=standin_arg,
        images=images_arg,
        store_dtype=config["cache"]["dtype"],
        batch_size=config["cache"]["batch_size"],
    conda:
        "../../envs/iisan.yaml"
    log:
        "logs/cache/{dataset}/{field}/{backbone}.log",
    benchmark:
        "benchmarks/cache/{dataset}/{field}/{backbone}.tsv"
    threads: 2
    resources:
        mem_mb=cache_mem_mb,
        runtime=cache_runtime,
        gpu=cache_gpus,
    shell:
        "iisan cache --name {wildcards.backbone} --spec {params.spec} {params.standin}"
        " --items {input.item_table:q} --field {wildcards.field} {params.images}"
        " --store-dtype {params.store_dtype} --batch-size {params.batch_size} --threads {threads}"
        " --out resources/cache/{wildcards.dataset}/{wildcards.field}/{wildcards.backbone} > {log} 2>&1"


rule prune:
    input:
        "resources/cache/{dataset}/{field}/{backbone}/manifest.json",
    output:
        array="resources/cache/{dataset}/{field}/{backbone}/pruned-{tscheme}/cache.npy",
        manifest="resources/cache/{dataset}/{field}/{backbone}/pruned-{tscheme}/manifest.json",
    params:
        layers=scheme_indices,
    conda:
        "../../envs/iisan.yaml"
    log:
        "logs/cache/{dataset}/{field}/{backbone}/prune-{tscheme}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=20,
    shell:
        "iisan prune --src resources/cache/{wildcards.dataset}/{wildcards.field}/{wildcards.backbone}"
        " --layers {params.layers} --out resources/cache/{wildcards.dataset}/{wildcards.field}/{wildcards.backbone}/pruned-{wildcards.tscheme}"
        " > {log} 2>&1"
