# Fig. 7: full vs dropped cache, IISAN-VA per text encoder.
from iisan.figures import fig7
from iisan.jobs import job

with job(snakemake):
    fig7(snakemake.params.rows, snakemake.input, snakemake.output.png, snakemake.output.csv)
