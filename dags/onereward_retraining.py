"""Scheduled OneReward retraining, one task per stage of the pipeline graph.

Environment: ONEREWARD_DAG_MODE (local | kubernetes), ONEREWARD_CONFIG (profile or YAML path),
ONEREWARD_OVERRIDES (JSON list of KEY=VALUE), ONEREWARD_SCHEDULE (cron), ONEREWARD_NEW_DATA_ASSET (URI).
"""

from onereward.orchestration.airflow_dag import build_dag

dag = build_dag()
