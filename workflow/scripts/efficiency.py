# results/efficiency.csv (time, memory, parameters and TPME per method and batch size) and Fig. 5.
from iisan.figures import fig5
from iisan.jobs import job
from iisan.tables import build_efficiency

with job(snakemake):
    fig5(build_efficiency(snakemake.params.rows, snakemake.input, snakemake.output.csv), snakemake.output.png)
