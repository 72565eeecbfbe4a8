"""The worker's lifecycle: Celery signal hooks, heartbeat, reaper, consumer and remote
control. Importing this package registers nothing; `workers.entry` does."""
