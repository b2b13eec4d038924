# results/efficiency.csv (time, memory, parameters and TPME per method and batch size) and Fig. 5.
from iisan.pipeline.jobs import job
from iisan.tables import build_efficiency
from iisan.tables.figures import fig5

with job(snakemake):
    fig5(build_efficiency(snakemake.params.rows, snakemake.input, snakemake.output.csv), snakemake.output.png)
