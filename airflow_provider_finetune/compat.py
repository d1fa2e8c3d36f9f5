"""Names that moved between the Airflow releases the provider supports (3.1 to 3.3).

Airflow 3.2 made the task SDK the home of the exceptions, ``conf`` and the schedules; 3.1 has them
in airflow-core only. Import them from here so one place knows where each lives.
"""

from __future__ import annotations

try:
    from airflow.sdk import conf
except ImportError:  # Airflow 3.1
    from airflow.configuration import conf

try:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException, TaskDeferred
except ImportError:  # Airflow 3.1
    from airflow.exceptions import AirflowFailException, AirflowSkipException, TaskDeferred

try:
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable
except ImportError:  # Airflow 3.1
    from airflow.timetables.assets import AssetOrTimeSchedule
    from airflow.timetables.trigger import CronTriggerTimetable

__all__ = [
    "AirflowFailException",
    "AirflowSkipException",
    "AssetOrTimeSchedule",
    "CronTriggerTimetable",
    "TaskDeferred",
    "conf",
]
