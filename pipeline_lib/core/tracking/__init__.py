"""MLflow tracking: the only package that imports mlflow. Every call names its run by id.

store (where the store is, its UI, experiments), runs (a run's params, metrics, tags, artifacts), stage_runs (the
nested run of each stage), logged_models (a logged model's files) and versions (the registered model's versions,
aliases and tags). What to do with them (the champion policy, rebuilding models) lives in pipeline_lib.assess.
"""

from pipeline_lib.core import privacy

privacy.quiet_mlflow()  # MLflow starts its telemetry client when it is first imported: off unless the user chose
