# Training: one experiment = dataset x towers x method x LayerDrop scheme x cache x seed; and its
# profile (a few timed steps at one batch size, for Fig. 5). Speed settings (config key speed) and
# keep_checkpoints are read by the job from the config: changing them reruns nothing. The tables
# plan each run under the canonical name of the blocks its towers keep (iisan.pipeline.plan.run_scheme), and
# the job runs that experiment whatever name its folder gives the scheme. A run whose `gpu`
# resource is k > 1 cards (the plan's choice, cluster.node_gpus) runs in k processes, one a card
# (iisan.training.distributed; README, "One training run on several cards").


rule train:
    input:
        unpack(get_run_inputs),
    output:
        plan.RUN_METRICS,
    log:
        "logs/train/{dataset}/{towers}/{method}/{scheme}/{cache}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train/{dataset}/{towers}/{method}/{scheme}/{cache}/seed{seed}.tsv"
    priority: get_priority("train")
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=get_train_mem_mb("train"),
        runtime=get_runtime("train"),
        gpu=get_gpus("train"),
        # the retry number, for the log's attempt headers (a killed run resumes from the
        # checkpoint.pt beside its output; <log>.attempts keeps every attempt's output)
        attempt=get_attempt,
    params:
        experiment=get_experiment,
    script:
        "../scripts/run.py"


use rule train as profile with:
    output:
        plan.PROFILE,
    log:
        "logs/efficiency/{dataset}/{towers}/{method}/{scheme}/{cache}/batch{batch}.log",
    benchmark:
        "results/benchmarks/efficiency/{dataset}/{towers}/{method}/{scheme}/{cache}/batch{batch}.tsv"
    priority: get_priority("profile")
    resources:
        mem_mb=get_train_mem_mb("profile"),
        runtime=get_runtime("profile"),
        gpu=get_gpus("profile"),
        attempt=get_attempt,
    params:
        experiment=get_profile_experiment,
        steps=config["efficiency"]["steps"],
