"""Orchestration: where every file lives and what each job runs (`plan`), the workflow's config
checks (`workflow`), the job graph and its price (`graph`, `budget`, `schedule`), running jobs
(`jobs`, `worker`, `gpus`) and the rehearsal of the paper's run (`rehearsal`)."""
