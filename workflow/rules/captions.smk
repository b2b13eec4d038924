# Captions: three frames per video, LLaVA-NeXT captions of covers and frames (text item fields
# cover_caption and video_caption), and the captioner stand-ins of the demo. A caption set is
# made by captions.shards jobs (iisan.captions.shards), merged by a local job when there are several.
from iisan.captions.shards import caption_outputs, caption_shards

CAPTION_SHARDS = caption_shards(config)


# a download: on the host that runs Snakemake, as the other fetch rules
localrules:
    fetch_videos,


rule fetch_videos:
    input:
        unpack(get_rehearsal_inputs),
        item_table=plan.ITEMS,
    output:
        plan.MICROLENS_VIDEOS_FETCHED,
    log:
        "logs/data/{dataset}/fetch_videos.log",
    wildcard_constraints:
        dataset=get_datasets_made_by("fetch_videos"),
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


rule videos_content:
    input:
        get_videos,
    output:
        plan.VIDEOS_CONTENT,
    log:
        "logs/captions/{dataset}/videos_content.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=120,
    script:
        "../scripts/videos_content.py"


# frames.zip is updated in place: the job takes the frames of unchanged videos from it. It decodes
# videos on all its threads and keeps the finished ones in frames.zip.parts/ as it goes, so that
# a job stopped by its time limit resumes there on its next attempt (iisan.data.frames). Its threads
# and minutes come from the measured seconds per video (rates.yaml frames:) and the dataset's
# items; the minutes at most cluster.max_runtime_min.
from iisan.pipeline.budget import frames_minutes, frames_threads


rule frames:
    input:
        item_table=plan.ITEMS,
        videos=get_videos_content,
    output:
        frames=update(plan.FRAMES),
        manifest=update(plan.FRAMES_MANIFEST),
    log:
        "logs/captions/{dataset}/frames.log",
    conda:
        "../../envs/iisan.yaml"
    threads: lambda wildcards: frames_threads(config, wildcards.dataset)
    resources:
        mem_mb=lambda wildcards, threads: 1000 + 200 * threads,
        runtime=lambda wildcards, threads, attempt: resources.capped_minutes(
            frames_minutes(config, wildcards.dataset, threads), config, attempt
        ),
        attempt=get_attempt,
    params:
        positions=config["captions"]["frames"],
        missing=config["captions"]["missing_videos"],
    script:
        "../scripts/frames.py"


rule build_captioner_standin:
    input:
        titles=plan.ITEMS.format(dataset=config["standin_corpus"]),
        prompts=workflow_file(config["captions"]["prompts"]),
    output:
        plan.CAPTIONER,
    log:
        "logs/captioners/{captioner}.log",
    wildcard_constraints:
        captioner=get_source_names("captioners", "demo"),
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
        plan.CAPTIONS if CAPTION_SHARDS == 1 else plan.CAPTION_SHARD,
    log:
        (
            "logs/captions/{dataset}/{source}.log"
            if CAPTION_SHARDS == 1
            else "logs/captions/{dataset}/{source}.{shard}-of-{shards}.log"
        ),
    wildcard_constraints:
        source="cover|video",
        shard=r"\d+",
        shards=str(CAPTION_SHARDS),
    priority: get_priority("caption")
    conda:
        "../../envs/iisan.yaml"
    threads: 2
    resources:
        mem_mb=get_caption_mem_mb,
        runtime=get_runtime("caption"),
        gpu=get_gpus("caption"),
        attempt=get_attempt,
    params:
        job=get_caption_job,
    script:
        "../scripts/caption.py"


if CAPTION_SHARDS > 1:

    rule merge_captions:
        input:
            item_table=plan.ITEMS,
            shards=lambda wildcards: caption_outputs(
                config, wildcards.dataset, wildcards.source
            ),
        output:
            plan.CAPTIONS,
        log:
            "logs/captions/{dataset}/{source}.merge.log",
        wildcard_constraints:
            source="cover|video",
        localrule: True
        conda:
            "../../envs/iisan.yaml"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        script:
            "../scripts/merge_captions.py"
