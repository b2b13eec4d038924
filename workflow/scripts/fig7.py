# Fig. 7: full vs dropped cache, IISAN-VA per text encoder.
from iisan.pipeline.jobs import job
from iisan.tables.figures import fig7

with job(snakemake):
    fig7(snakemake.params.rows, snakemake.input, snakemake.output.png, snakemake.output.csv)
