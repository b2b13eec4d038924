# One experiment: train and evaluate it (rule train; resumes from checkpoint.pt beside its output
# when restarted), or time a few of its training steps at one batch size (rule profile, Fig. 5).
from iisan.jobs import job, run_inputs

with job(snakemake, keep_attempts=snakemake.rule == "train"):
    from iisan.experiment import profile_experiment, run_experiment

    exp, paths = run_inputs(snakemake)
    if snakemake.rule == "profile":
        profile_experiment(exp, **paths, out=snakemake.output[0], batch_size=int(snakemake.wildcards.batch),
                           steps=snakemake.params.steps)
    else:
        run_experiment(exp, **paths, out=snakemake.output[0], keep_checkpoint=snakemake.config["keep_checkpoints"])
