"""Backups and restore of users' data folders (issue 17.1). See core.py for the format,
reader.py for how a hostile folder is read, ops.py for restore, schedule.py for the service."""
