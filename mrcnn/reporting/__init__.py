"""After the runs: what each job built (``job_record``) and the ablation report over a sweep (``report``).

``python -m mrcnn.reporting <sweep dir>`` rebuilds a sweep's report (see ``mrcnn.reporting.report``).
"""
