# Captions: three frames per video, LLaVA-NeXT captions of covers and frames (text item fields
# cover_caption and video_caption), and the captioner stand-ins of the demo.


rule fetch_videos:
    input:
        item_table=plan.ITEMS,
    output:
        plan.MICROLENS_VIDEOS_FETCHED,
    log:
        "logs/data/{dataset}/fetch_videos.log",
    wildcard_constraints:
        dataset=get_datasets_of_kind("microlens"),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=24 * 60,
    params:
        folder=get_videos_relpath,
        base_url=lambda wildcards: get_dataset_source(wildcards.dataset).get(
            "url", microlens.SITE
        ),
        mirror=config["mirror"],
    script:
        "../scripts/fetch_videos.py"


rule frames:
    input:
        item_table=plan.ITEMS,
        videos=get_videos,
    output:
        frames=plan.FRAMES,
        manifest=plan.FRAMES_MANIFEST,
    log:
        "logs/captions/{dataset}/frames.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        positions=config["captions"]["frames"],
        missing=config["captions"]["missing_videos"],
    script:
        "../scripts/frames.py"


rule build_captioner_standin:
    input:
        titles=plan.ITEMS.format(dataset=config["standin_corpus"]),
        prompts=config["captions"]["prompts"],
    output:
        plan.CAPTIONER,
    log:
        "logs/captioners/{captioner}.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=lambda wildcards: config["captioners"][wildcards.captioner],
    script:
        "../scripts/captioner_standin.py"


rule caption:
    input:
        unpack(get_caption_inputs),
    output:
        plan.CAPTIONS,
    log:
        "logs/captions/{dataset}/{source}.log",
    wildcard_constraints:
        source="cover|video",
    conda:
        "../../envs/iisan.yaml"
    threads: 2
    resources:
        mem_mb=get_caption_mem_mb,
        runtime=600,
        gpu=get_caption_gpus,
    params:
        captioner=get_captioner,
        positions=config["captions"]["frames"],
        max_new_tokens=config["captions"]["max_new_tokens"],
        batch_size=config["captions"]["batch_size"],
        kv_cache=config["captions"]["kv_cache"],
        attention=config["captions"]["attention"],
        workers=config["captions"]["workers"],
    script:
        "../scripts/caption.py"
