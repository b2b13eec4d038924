# results/claims.csv: the paper's claims decided on this run's tables.
from iisan.pipeline.jobs import job
from iisan.tables.claims import build_claims

with job(snakemake):
    build_claims(dict(snakemake.input.items()), snakemake.output[0], paper=snakemake.params.paper)
