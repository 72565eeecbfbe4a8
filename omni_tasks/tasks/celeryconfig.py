"""Celery reads its settings from this module, on first use of `app.conf`."""

from omni_tasks.tasks.celery_app import settings_for_process

globals().update(settings_for_process())
