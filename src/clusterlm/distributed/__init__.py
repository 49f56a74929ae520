"""Where a process runs and how it meets the others: the launcher's environment (torchrun's,
or adopted from mpirun's), the process group and its device mesh (``runtime``, ``mesh``), where
the job's stores and connections listen (``listeners``), the job's secret and the signatures
and challenges built on it (``job_secret``, ``signing``), the parameter-server rendezvous,
restart counts, and the local launcher that tests and benchmarks use to start N ranks in one
call (``local_spawn``)."""
